"""idcscope: invasive ductal carcinoma detection in H&E histopathology patches."""

__version__ = "0.1.0"
