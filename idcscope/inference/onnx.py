"""Run a model on ONNX Runtime, from its exported graph (``inference.export``).

Scoring a checkpoint or a model folder on ONNX Runtime uses its graph from the user's cache
(``$IDCSCOPE_CACHE/onnx/<key>/``, see ``data.cache``), exported there once: the key is a
sha256 of what the graph computes (the model, the sha256 of its verified weights, the
normalisation), and the sha256 of the graph file's bytes, recorded beside it when it was
exported, is checked at every load; a graph that does not match is exported again from the
weights, never run. Nothing is written beside the model. An ``.onnx`` file a user names
is theirs, and is run as it is. Once a model's graph is in the cache, scoring it needs
neither torch nor the model's weights parsed: a patch is scored in a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from ..cpus import usable_cpus
from ..data.cache import default_cache_dir, private_dir, write_atomic
from ..errors import IdcscopeError
from ..models.checkpoint import read_fields, weights_sha256

logger = logging.getLogger(__name__)

GRAPH_FORMAT = "idcscope-onnx/1"  # how a graph is laid out: part of its cache key
GRAPH_RECORD = "graph.json"  # beside a cached graph: its file name and the sha256 of its bytes


def graph_key(checkpoint: str | Path) -> str:
    """sha256 of what a checkpoint's graph computes: the model, its weights (by their
    sha256, ``models.checkpoint.weights_sha256``) and the normalisation. Thresholds,
    temperature and context do not enter it: copies of a model that differ only in those
    share one graph."""
    ckpt = read_fields(checkpoint)
    prep = ckpt["preprocessing"]
    spec = {
        "format": GRAPH_FORMAT,
        "model": ckpt["model"],
        "mean": prep["mean"],
        "std": prep["std"],
        "weights": weights_sha256(checkpoint),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def model_cache_dir(checkpoint: str | Path) -> Path:
    """The user's cache folder for what is derived from a checkpoint (not created here)."""
    return default_cache_dir() / "onnx" / graph_key(checkpoint)[:32]


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
    from .export import export_onnx

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
