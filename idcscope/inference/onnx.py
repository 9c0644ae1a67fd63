"""A model's exported graph in an ONNX Runtime session on the CPU, with its metadata.

A graph comes from ``inference.export``; the graph of a checkpoint or model folder is kept
in the user's cache (``inference.graphs``). Scoring one needs neither torch nor the
model's weights parsed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..cpus import usable_cpus
from ..errors import IdcscopeError


class OnnxModel:
    """An exported model in an ONNX Runtime session on the CPU, with its metadata.

    Args:
        path: an ``.onnx`` file written by ``export_onnx``.
        threads: intra-op threads; None uses every core this process may run on.
        data: the graph's bytes, when they were read (and checked) already; ``path`` then
            only names them.

    The session's threads sleep instead of spinning between runs: they share the cores
    with the threads that decode the next patches.
    """

    def __init__(self, path: str | Path, threads: int | None = None, data: bytes | None = None):
        import onnxruntime as ort

        path = Path(path)
        if data is None and not path.is_file():
            raise IdcscopeError(f"{path}: ONNX file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or usable_cpus()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only: ORT's warnings are about its own graph passes
        try:
            self.session = ort.InferenceSession(
                str(path) if data is None else data, opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise IdcscopeError(
                f"{path}: not an ONNX graph ONNX Runtime can load ({_first_line(e)}); "
                "an .onnx model is one `idcscope export --onnx` writes"
            ) from e
        props = self.session.get_modelmeta().custom_metadata_map
        # The model's fields (``models.schema``), read as a checkpoint's are by the Predictor.
        self.metadata = {k: _json_or_text(v) for k, v in props.items()}
        self.path = path
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.fixed_batch = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else None

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 logits (B, 2) of a float32 batch (B, C, H, W) in [0, 1]."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return self._run(x)
        b, out = self.fixed_batch, []
        for s in range(0, len(x), b):  # a fixed-batch graph: run whole batches, pad the last
            part = x[s : s + b]
            padded = np.concatenate([part, np.zeros((b - len(part), *x.shape[1:]), x.dtype)])
            out.append(self._run(padded)[: len(part)])
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
