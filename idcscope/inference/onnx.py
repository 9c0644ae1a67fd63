"""Export a checkpoint to ONNX and run it with ONNX Runtime.

The exported graph takes ``patches``, float32 of shape (B, C, H, W) with values in [0, 1]
(the model input of ``data.preprocess`` divided by 255: C = 3, the RGB patch, or 6, the
patch then the block of its neighbours), and returns ``logits`` (B, 2). Normalisation is
folded into the graph, so a consumer needs no idcscope code; the class names, decision
threshold, temperature, spatial context and preprocessing travel in the file's
``metadata_props``, each value JSON-encoded, so the ``.onnx`` file describes itself as the
checkpoint does, and ``graph_sha256`` identifies the weights it computes with.

Export uses torch's ``torch.export``-based exporter (the default since torch 2.9; it needs
``onnxscript``), which writes opset 18 or newer; one self-contained file, no external data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..cpus import usable_cpus
from ..data.cache import default_cache_dir
from ..errors import IdcscopeError
from ..models.checkpoint import load_model, read_checkpoint

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
    "logit_bias",
    "lone_calibration",
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


def graph_digest(ckpt: dict) -> str:
    """sha256 of what the graph computes: the model, its weights and the normalisation.
    Thresholds, temperature and context do not enter it: copies of a checkpoint that
    differ only in those share one graph."""
    h = hashlib.sha256(FORMAT.encode())
    prep = ckpt["preprocessing"]
    spec = {"model": ckpt["model"], "mean": prep["mean"], "std": prep["std"]}
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    for name, tensor in sorted(ckpt["state_dict"].items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
        The path written (atomically: a temporary file, then a rename). The graph is
        checked with ``onnx.checker`` and its logits are compared with the torch model's
        on a random batch before returning.
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
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            # torch.export's internals warn about their own deprecations; nothing to act on.
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                wrapped,
                (example,),
                tmp,
                dynamo=True,
                verbose=False,
                input_names=["patches"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_shapes=dynamic,
                external_data=False,
            )
        proto = onnx.load(tmp)
        contract = NEIGHBOURHOOD_CONTRACT if prep.get("neighbourhood") else INPUT_CONTRACT
        meta = {"format": FORMAT, "input": contract, "source": checkpoint.name}
        meta["graph_sha256"] = graph_digest(read_checkpoint(checkpoint))
        meta.update({k: ckpt[k] for k in _META_FIELDS if k in ckpt})
        onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
        proto.doc_string = f"idcscope {ckpt['model']['name']}: P(IDC) logits of 50x50 H&E patches"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        _check_agreement(wrapped, OnnxModel(tmp), example, out)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(
        "exported %s to %s (opset %d, batch %s)", checkpoint, out, opset, batch_size or "dynamic"
    )
    return out


def cached_onnx(checkpoint: str | Path) -> Path:
    """The ONNX graph of a checkpoint, exported once and kept beside it (``best.pt`` ->
    ``best.onnx``, or under the cache folder when that folder is read-only).

    Graphs are matched by :func:`graph_digest`, so a retrained checkpoint is exported
    again, and copies of one model with other thresholds share its graph (each export is
    also kept under ``$IDCSCOPE_CACHE/onnx``).
    """
    import shutil

    checkpoint = Path(checkpoint)
    digest = graph_digest(read_checkpoint(checkpoint))
    # A model folder keeps its graph inside (read-only when installed: then the cache).
    beside = checkpoint / "model.onnx" if checkpoint.is_dir() else checkpoint.with_suffix(".onnx")
    shared = default_cache_dir() / "onnx" / f"{digest[:32]}.onnx"
    for path in (beside, shared):
        if path.is_file() and _graph_digest(path) == digest:
            return path
    writable = os.access(beside.parent, os.W_OK)
    logger.info("exporting %s to ONNX once (kept %s)", checkpoint, beside if writable else shared)
    path = export_onnx(checkpoint, beside if writable else shared)
    if path != shared:
        shared.parent.mkdir(parents=True, exist_ok=True)
        tmp = shared.with_name(f".{shared.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(shared)
    return path


def _graph_digest(path: Path) -> str | None:
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        return json.loads(props.get("graph_sha256", "null"))
    except Exception:  # an unreadable cached graph is simply exported again
        return None


def _check_agreement(torch_model: nn.Module, runner: OnnxModel, x: torch.Tensor, path) -> None:
    with torch.no_grad():
        expected = torch_model(x).numpy()
    got = runner.logits(x.numpy())
    if not np.allclose(got, expected, atol=1e-3, rtol=1e-3):
        diff = np.abs(got - expected).max()
        raise IdcscopeError(f"{path}: ONNX Runtime and torch disagree (max |diff| {diff:.2e})")


class OnnxModel:
    """An exported model in an ONNX Runtime session on the CPU, with its metadata.

    Args:
        path: an ``.onnx`` file written by ``export_onnx``.
        threads: intra-op threads; None uses every core this process may run on.

    The session's threads sleep instead of spinning between runs: they share the cores
    with the threads that decode the next patches.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise IdcscopeError(f"{path}: ONNX file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or usable_cpus()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    def from_path(cls, path: str | Path, threads: int | None = None) -> OnnxModel:
        """Open an ``.onnx`` file, or a checkpoint's cached graph (see :func:`cached_onnx`)."""
        path = Path(path)
        return cls(path if path.suffix == ".onnx" else cached_onnx(path), threads)

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))

    @property
    def temperature(self) -> float:
        return float(self.metadata.get("temperature", 1.0))

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.get("class_names", ["no_idc", "idc"]))

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


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
