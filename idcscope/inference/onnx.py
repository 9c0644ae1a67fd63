"""Export a checkpoint to ONNX and run it with ONNX Runtime.

The exported graph takes ``patches``, float32 RGB of shape (B, 3, H, W) with values in
[0, 1] (what ``engine.to_float`` makes of uint8 patches), and returns ``logits`` (B, 2).
Normalisation is folded into the graph, so a consumer needs no idcscope code; the class
names, decision threshold and preprocessing travel in the file's ``metadata_props``, each
value JSON-encoded, so the ``.onnx`` file describes itself as the checkpoint does.

Export uses torch's ``torch.export``-based exporter (the default since torch 2.9; it needs
``onnxscript``), which writes opset 18 or newer; one self-contained file, no external data.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import load_model
from .errors import IdcscopeError
from .progress import progress_bar

logger = logging.getLogger(__name__)

FORMAT = "idcscope-onnx/1"
MIN_OPSET = 18  # the torch.export-based exporter writes no older opset
INPUT_CONTRACT = "float32 (B, 3, H, W) RGB in [0, 1]; normalisation is inside the graph"
NEIGHBOURHOOD_CONTRACT = (
    "float32 (B, 6, H, W) in [0, 1]: the RGB patch, then the RGB block of its neighbours "
    "averaged down to (H, W) (idcscope.data.neighbourhood); normalisation is inside the graph"
)
# Checkpoint fields copied into the ONNX metadata when present.
_META_FIELDS = (
    "model",
    "class_names",
    "threshold",
    "threshold_method",
    "temperature",
    "context",
    "preprocessing",
    "epoch",
)


class _Normalised(nn.Module):
    """The model behind its normalisation, so the graph takes images in [0, 1]."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.model((patches - self.mean) / self.std)


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path | None = None,
    opset: int = MIN_OPSET,
    batch_size: int | None = None,
) -> Path:
    """Write the checkpoint's model, normalisation included, as a single ONNX file.

    Args:
        checkpoint: an idcscope checkpoint (``.pt``).
        out_path: where to write; defaults to the checkpoint's path with suffix ``.onnx``.
        opset: ONNX opset version, 18 or newer.
        batch_size: a fixed batch size; None exports a dynamic batch dimension.

    Returns:
        The path written. The graph is checked with ``onnx.checker`` and its logits are
        compared with the torch model's on a random batch before returning.
    """
    import onnx

    if opset < MIN_OPSET:
        raise IdcscopeError(f"opset {opset} is too old: the exporter writes {MIN_OPSET} or newer")
    checkpoint = Path(checkpoint)
    out = Path(out_path) if out_path else checkpoint.with_suffix(".onnx")
    model, ckpt = load_model(checkpoint)
    prep = ckpt["preprocessing"]
    wrapped = _Normalised(model, prep["mean"], prep["std"]).eval()
    size = int(prep.get("patch_size", 50))
    # torch.export specialises sizes 0 and 1, so the example batch for a dynamic one is 2.
    # Three channels, or six for a model that sees each patch's neighbourhood too.
    shape = (batch_size or 2, len(prep["mean"]), size, size)
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    dynamic = None if batch_size else {"patches": {0: torch.export.Dim("batch")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch.export's internals warn about their own deprecations; nothing to act on here.
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            wrapped,
            (example,),
            out,
            dynamo=True,
            verbose=False,
            input_names=["patches"],
            output_names=["logits"],
            opset_version=opset,
            dynamic_shapes=dynamic,
            external_data=False,
        )
    proto = onnx.load(out)
    contract = NEIGHBOURHOOD_CONTRACT if prep.get("neighbourhood") else INPUT_CONTRACT
    meta = {"format": FORMAT, "input": contract, "source": checkpoint.name}
    meta.update({k: ckpt[k] for k in _META_FIELDS if k in ckpt})
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
    proto.doc_string = f"idcscope {ckpt['model']['name']}: P(IDC) logits of 50x50 H&E patches"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, out)
    _check_agreement(wrapped, OnnxPredictor(out), example, out)
    logger.info(
        "exported %s to %s (opset %d, batch %s)", checkpoint, out, opset, batch_size or "dynamic"
    )
    return out


def _check_agreement(
    torch_model: nn.Module, runner: OnnxPredictor, x: torch.Tensor, path: Path
) -> None:
    with torch.no_grad():
        expected = torch_model(x)
    got = runner.logits(x)
    if not torch.allclose(got, expected, atol=1e-3, rtol=1e-3):
        diff = (got - expected).abs().max().item()
        raise IdcscopeError(f"{path}: ONNX Runtime and torch disagree (max |diff| {diff:.2e})")


class OnnxPredictor:
    """An exported model in an ONNX Runtime session on the CPU, with its metadata.

    Args:
        path: an ``.onnx`` file written by ``export_onnx``.
        threads: intra-op threads; None uses every core this process may run on.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise IdcscopeError(f"{path}: ONNX file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.log_severity_level = 3  # errors only: ORT's warnings are about its own graph passes
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise IdcscopeError(f"{path}: not a loadable ONNX model ({e})") from e
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k: _json_or_text(v) for k, v in props.items()}
        if self.metadata.get("format") != FORMAT:
            logger.warning("%s: no idcscope metadata; assuming threshold 0.5", path)
        self.path = path
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.fixed_batch = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else None

    @classmethod
    def from_path(cls, path: str | Path, threads: int | None = None) -> OnnxPredictor:
        """Open an ``.onnx`` file, or export a checkpoint to a temporary folder and open that."""
        path = Path(path)
        if path.suffix == ".onnx":
            return cls(path, threads)
        with tempfile.TemporaryDirectory() as tmp:
            # The session holds the whole graph in memory, so the file can go at once.
            return cls(export_onnx(path, Path(tmp) / "model.onnx"), threads)

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))

    @property
    def temperature(self) -> float:
        return float(self.metadata.get("temperature", 1.0))

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.get("class_names", ["no_idc", "idc"]))

    def logits(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Logits (float32 tensor) of a float batch (B, 3, H, W) in [0, 1]."""
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else batch
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return torch.from_numpy(self._run(x))
        b, out = self.fixed_batch, []
        for s in range(0, len(x), b):  # a fixed-batch graph: run whole batches, pad the last
            part = x[s : s + b]
            padded = np.concatenate([part, np.zeros((b - len(part), *x.shape[1:]), x.dtype)])
            out.append(self._run(padded)[: len(part)])
        return torch.from_numpy(np.concatenate(out)) if out else torch.empty(0, 2)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def predict_logits(
        self,
        images: np.ndarray,
        rows: np.ndarray | None = None,
        batch_size: int = 512,
        tta: bool = False,
        desc: str = "predict (onnx)",
    ) -> torch.Tensor:
        """As ``engine.predict_logits``: logits of uint8 patches (N, H, W, C) at ``rows``."""
        from .data.augment import dihedral_all

        rows = np.arange(len(images)) if rows is None else np.asarray(rows)
        out = []
        with progress_bar(desc, total=len(rows)) as advance:
            for s in range(0, len(rows), batch_size):
                x = to_float_nchw(images[rows[s : s + batch_size]])
                if tta:  # the 8 views in one run, then the mean of their logits
                    views = dihedral_all(torch.from_numpy(x))
                    logits = self.logits(views.flatten(0, 1)).view(8, len(x), -1).mean(0)
                else:
                    logits = self.logits(x)
                out.append(logits)
                advance(len(x))
        return torch.cat(out) if out else torch.empty(0, 2)


def to_float_nchw(batch: np.ndarray) -> np.ndarray:
    """(B, H, W, C) uint8 -> C-contiguous (B, C, H, W) float32 in [0, 1], as ``engine.to_float``.

    One numpy pass straight into the layout ONNX Runtime reads: about 5x faster than
    ``to_float`` followed by the copy that makes its channels-last result contiguous.
    """
    b, h, w, c = batch.shape
    out = np.empty((b, c, h, w), np.float32)
    np.divide(batch.transpose(0, 3, 1, 2), np.float32(255), out=out)
    return out


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
