"""Each model's ONNX graph, exported once into the user's cache and checked at every load.

Scoring a checkpoint or a model folder on ONNX Runtime uses its graph from the user's cache
(``$IDCSCOPE_CACHE/onnx/<key>/``, see ``data.cache``), exported there once
(``inference.export``): the key is a sha256 of what the graph computes (the model, the
sha256 of its verified weights, the normalisation), and the sha256 of the graph file's
bytes, recorded beside it when it was exported, is checked at every load; a graph that
does not match is exported again from the weights, never run. Nothing is written beside
the model. An ``.onnx`` file a user names is theirs, and is run as it is. Once a model's
graph is cached, opening it needs neither torch nor the model's weights parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from ..data.cache import default_cache_dir, private_dir, write_atomic
from ..models.checkpoint import read_fields, weights_sha256
from .onnx import OnnxModel

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

    Open it with :func:`open_graph`, which checks the bytes it runs.
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


def open_graph(path: str | Path, threads: int | None = None) -> OnnxModel:
    """An ``.onnx`` file as it is, or a checkpoint's cached graph, checked (see
    :func:`cached_onnx`), in an ONNX Runtime session of ``threads`` intra-op threads."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxModel(path, threads)
    graph, data = verified_graph(path)
    return OnnxModel(graph, threads, data)
