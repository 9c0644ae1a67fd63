"""Export a checkpoint to ONNX and run it with ONNX Runtime.

The exported graph takes ``patches``, float32 of shape (B, C, H, W) with values in [0, 1]
(the model input of ``data.preprocess`` divided by 255: C = 3, the RGB patch, or 6, the
patch then the block of its neighbours), and returns ``logits`` (B, 2). Normalisation is
folded into the graph, so a consumer needs no idcscope code; the class names, decision
threshold, temperature, spatial context and preprocessing travel in the file's
``metadata_props``, each value JSON-encoded, so the ``.onnx`` file describes itself as the
checkpoint does, and ``weights_sha256`` names the weights it was exported from.

Scoring a checkpoint or a model folder on ONNX Runtime uses its graph from the user's cache
(``$IDCSCOPE_CACHE/onnx/<key>/``, see ``data.cache``), exported there once: the key is a
sha256 of what the graph computes (the model, the sha256 of its verified weights, the
normalisation), and the sha256 of the graph file's bytes, recorded beside it when it was
exported, is checked at every load; a graph that does not match is exported again from the
weights, never run. Nothing is written beside the model. An ``.onnx`` file a user names
is theirs, and is run as it is.

Export uses torch's ``torch.export``-based exporter (the default since torch 2.9; it needs
``onnxscript``), which writes opset 18 or newer; one self-contained file, no external data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..cpus import usable_cpus
from ..data.cache import default_cache_dir, private_dir, write_atomic
from ..errors import IdcscopeError
from ..models.checkpoint import load_model, read_checkpoint, weights_sha256

logger = logging.getLogger(__name__)

FORMAT = "idcscope-onnx/1"
MIN_OPSET = 18  # the torch.export-based exporter writes no older opset
GRAPH_RECORD = "graph.json"  # beside a cached graph: its file name and the sha256 of its bytes
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


def graph_key(checkpoint: str | Path) -> str:
    """sha256 of what a checkpoint's graph computes: the model, its weights (by their
    sha256, ``models.checkpoint.weights_sha256``) and the normalisation. Thresholds,
    temperature and context do not enter it: copies of a model that differ only in those
    share one graph."""
    ckpt = read_checkpoint(checkpoint)
    prep = ckpt["preprocessing"]
    spec = {
        "format": FORMAT,
        "model": ckpt["model"],
        "mean": prep["mean"],
        "std": prep["std"],
        "weights": weights_sha256(checkpoint),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def model_cache_dir(checkpoint: str | Path) -> Path:
    """The user's cache folder for what is derived from a checkpoint (not created here)."""
    return default_cache_dir() / "onnx" / graph_key(checkpoint)[:32]


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
        meta["weights_sha256"] = weights_sha256(checkpoint)
        meta.update({k: ckpt[k] for k in _META_FIELDS if k in ckpt})
        onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
        proto.doc_string = f"idcscope {ckpt['model']['name']}: P(IDC) logits of 50x50 H&E patches"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        _check_agreement(wrapped, OnnxModel(tmp), example, out)
        tmp.replace(out)
    except OSError as e:  # a full disk or a file-size limit: say which file, in one line
        raise IdcscopeError(f"{out}: write failed ({e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(
        "exported %s to %s (opset %d, batch %s)", checkpoint, out, opset, batch_size or "dynamic"
    )
    return out


def cached_onnx(checkpoint: str | Path) -> Path:
    """The ONNX graph of a checkpoint or model folder, from the user's cache: exported there
    once, its bytes checked against the sha256 recorded then (see the module's docstring).

    Load it with ``OnnxModel.from_path(checkpoint)``, which checks the bytes it runs.
    """
    return verified_graph(checkpoint)[0]


def verified_graph(checkpoint: str | Path) -> tuple[Path, bytes]:
    """``(path, bytes)`` of a checkpoint's cached graph whose bytes have the sha256 recorded
    when it was exported; exported anew when there is none or it does not match."""
    checkpoint = Path(checkpoint)
    folder = model_cache_dir(checkpoint)
    record = folder / GRAPH_RECORD
    try:
        entry = json.loads(record.read_text())
        name, want = entry["file"], entry["sha256"]
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".onnx"):
            raise ValueError(f"it names {name!r}, not a graph in its folder")
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        pass  # not exported on this machine yet
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s is damaged (%s); exporting %s again", record, e, checkpoint)
    else:
        digest = hashlib.sha256(data).hexdigest()
        if digest == want:
            return folder / name, data
        logger.warning(
            "%s: sha256 %s... is not the %s... recorded when it was exported: the graph was "
            "changed, and is exported again from the verified weights of %s",
            folder / name,
            digest[:16],
            str(want)[:16],
            checkpoint,
        )
        (folder / name).unlink(missing_ok=True)
    return _export_to_cache(checkpoint, folder)


def _export_to_cache(checkpoint: Path, folder: Path) -> tuple[Path, bytes]:
    logger.info("exporting %s to ONNX once, into %s", checkpoint, folder)
    private_dir(folder)
    tmp = folder / f"export-{os.getpid()}-{threading.get_ident()}.onnx"
    try:
        export_onnx(checkpoint, tmp)
        data = tmp.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        # Named by its bytes: a process reading an older record never reads this one.
        path = folder / f"{digest[:16]}.onnx"
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"file": path.name, "sha256": digest, "source": str(checkpoint)}
    write_atomic(folder / GRAPH_RECORD, json.dumps(record, indent=1) + "\n")
    return path, data


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
        self.metadata = {k: _json_or_text(v) for k, v in props.items()}
        if self.metadata.get("format") != FORMAT:
            logger.warning("%s: no idcscope metadata; assuming threshold 0.5", path)
        self.path = path
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.fixed_batch = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else None

    @classmethod
    def from_path(cls, path: str | Path, threads: int | None = None) -> OnnxModel:
        """Open an ``.onnx`` file as it is, or a checkpoint's cached graph, checked (see
        :func:`cached_onnx`)."""
        path = Path(path)
        if path.suffix == ".onnx":
            return cls(path, threads)
        graph, data = verified_graph(path)
        return cls(graph, threads, data)

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


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
