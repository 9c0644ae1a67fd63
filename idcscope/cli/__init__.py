"""The ``idcscope`` command: one module per group of subcommands, heavy imports inside each.

``app`` (``cli.app``) holds the shared options; importing the command modules registers
their commands on it, in the order ``idcscope --help`` lists them.
"""

from . import learn, prepare, score, views  # noqa: F401  (registers the commands)
from .app import app

__all__ = ["app"]
