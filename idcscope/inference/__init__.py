"""Scoring patches: the one Predictor every command uses, its engines, and streaming at scale.

``Predictor`` (``predictor``) owns the path from decoded pixels to calibrated P(IDC);
``backends`` runs the model in torch or ONNX Runtime (``onnx`` exports and caches the
graph); ``stream`` keeps decoding, preprocessing and the forward pass busy at once;
``predict`` turns files into a table, written as it is scored; ``explain`` adds Grad-CAM
and saliency maps on top of the Predictor's probability; ``calibration`` applies the
checkpoint's temperature.
"""

from .predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
