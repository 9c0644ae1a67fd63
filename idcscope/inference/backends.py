"""Where the model runs: torch or ONNX Runtime behind one interface, the faster by default.

Both take the uint8 model input (B, C, H, W) of ``data.preprocess`` and return float32
logits (B, 2); both feed the network the same float32 values (the bytes divided by 255),
so in fp32 they agree to float rounding. ``engine="auto"`` times both on this machine
once per model and remembers the faster in the user's cache, beside the model's ONNX graph
(``inference.graphs``; never beside the model): ONNX Runtime wins on CPUs (torch is slow at the depthwise convolutions of ``cancernet``),
torch wherever a GPU is asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..cpus import usable_cpus
from ..data.preprocess import Preprocessing, to_float
from ..errors import IdcscopeError
from .workers import FORWARD, Workers, workers

if TYPE_CHECKING:  # torch is imported where the torch engine runs or is timed
    import torch.nn as nn

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnx")
# Patches per forward pass: small batches keep activations in cache on a CPU (ONNX
# Runtime, 2 cores: 4,300 patches/s at 32, 3,500 at 512; torch fp32: 2,600 at 64, 1,100
# at 1,024); a GPU wants large ones.
BATCH = {"onnx": 32, "torch": 64, "cuda": 512}
ENGINE_RECORD = "engine.json"


def as_float(x: np.ndarray) -> np.ndarray:
    """uint8 model input -> float32 in [0, 1], the values ``to_float`` gives torch."""
    return np.divide(x, np.float32(255), dtype=np.float32)


def _views(x: np.ndarray) -> np.ndarray:
    """The 8 dihedral views of a uint8 batch, (8 * B, C, H, W), the identity first."""
    import torch

    from ..data.augment import dihedral_all

    return dihedral_all(torch.from_numpy(np.ascontiguousarray(x))).flatten(0, 1).numpy()


class TorchBackend:
    """A torch model (BatchNorm folded) on ``device`` at ``precision``."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        prep: Preprocessing,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int | None = None,
    ):
        import torch

        from ..models.runtime import fuse_for_inference

        if prep.channels_last:  # the layout the normalised batches come in
            model = model.to(memory_format=torch.channels_last)
        self.model, self.prep = fuse_for_inference(model.to(device)), prep
        self.device, self.precision = device, precision
        self.batch_size = batch_size or BATCH["cuda" if device.startswith("cuda") else "torch"]

    def submit(self, x: np.ndarray, tta: bool = False, priority: tuple = ()):
        """The function that scores ``x`` when called: torch runs in the caller, on its
        own threads, once the caller is ready for the result."""
        return lambda: self.logits(x, tta)

    def logits(self, x: np.ndarray, tta: bool = False) -> np.ndarray:
        """float32 logits of uint8 model input ``x`` (the mean over 8 views with ``tta``)."""
        import torch

        from ..models.runtime import autocast

        out = []
        for s in range(0, len(x), self.batch_size):
            part = x[s : s + self.batch_size]
            views = _views(part) if tta else part
            with torch.no_grad(), autocast(self.precision, self.device):
                logits = self.model(self.prep(to_float(views, self.device))).float().cpu()
            out.append(logits.view(8, len(part), -1).mean(0) if tta else logits)
        return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


class OnnxBackend:
    """An exported graph in ONNX Runtime (normalisation inside, see ``inference.onnx``).

    Each batch runs on one thread, as many at once as ``pool`` has workers (one per
    core): on 2 cores that scores 4,600 patches/s where one run over 2 intra-op threads
    scores 3,500 (no thread handshakes inside a layer), and the same workers decode and
    prepare the next patches in between (``workers``).
    """

    name = "onnx"

    def __init__(self, model, batch_size: int | None = None, pool: Workers | None = None):
        self.model, self.batch_size, self.pool = model, batch_size or BATCH["onnx"], pool

    def logits(self, x: np.ndarray, tta: bool = False) -> np.ndarray:
        """float32 logits of uint8 model input ``x`` (the mean over 8 views with ``tta``)."""
        return self.submit(x, tta)()

    def submit(self, x: np.ndarray, tta: bool = False, priority: tuple = (FORWARD, -1)):
        """Queue the batches of ``x`` on the workers, at ``priority``; returns the function
        that waits for their logits. Never call that function from a worker thread."""

        def run(part: np.ndarray) -> np.ndarray:
            if tta:  # the 8 views in one run, then the mean of their logits
                return self.model.logits(as_float(_views(part))).reshape(8, len(part), -1).mean(0)
            return self.model.logits(as_float(part))

        parts = [x[s : s + self.batch_size] for s in range(0, len(x), self.batch_size)]
        if self.pool is None:
            done = [run(p) for p in parts]
            futures = None
        else:
            futures = [self.pool.submit(priority, run, p) for p in parts]

        def wait() -> np.ndarray:
            out = done if futures is None else [f.result() for f in futures]
            return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

        return wait


def create_backend(
    path: Path,
    prep: Preprocessing,
    engine: str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
    batch_size: int | None = None,
    threads: int | None = None,
):
    """The backend ``engine`` names for the checkpoint at ``path``; ``"auto"`` is the faster
    one here (see :func:`choose_engine`). The torch model is built only for the torch
    engine (or to time it once): ONNX Runtime runs the cached graph alone."""
    if engine not in ENGINES:
        raise IdcscopeError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "onnx" and not device.startswith("cpu"):
        raise IdcscopeError(f"the onnx engine runs on the CPU, not on {device!r}")
    if engine == "auto":
        engine = "torch" if not device.startswith("cpu") else choose_engine(path, prep)
    if engine == "torch":
        return TorchBackend(_model(path, device), prep, device, precision, batch_size)
    return onnx_backend(path, batch_size, threads)


def _model(path: Path, device: str = "cpu") -> nn.Module:
    from ..models.checkpoint import load_model

    return load_model(path, device)[0]


def onnx_backend(path: Path, batch_size: int | None = None, threads: int | None = None):
    """ONNX Runtime for a checkpoint (its cached graph) or an ``.onnx`` file, running
    ``threads`` batches at once (default: one per core)."""
    from .graphs import open_graph

    return OnnxBackend(open_graph(path, threads=1), batch_size, workers(threads))


def choose_engine(path: Path, prep: Preprocessing) -> str:
    """The engine that scores this checkpoint faster on this machine, timed once.

    The rates are kept in ``engine.json`` in the model's cache folder (beside its ONNX
    graph, ``inference.graphs.model_cache_dir``), by CPU and core count, so later runs read
    the answer instead of timing again (and need not import torch when it is ONNX).
    """
    from ..data.cache import private_dir, write_atomic
    from .graphs import model_cache_dir

    if path.suffix == ".onnx":
        return "onnx"
    record = model_cache_dir(path) / ENGINE_RECORD
    machine = _machine()
    known = _json_dict(record)  # {} when not timed on this machine yet
    mine = known.get(machine)
    if isinstance(mine, dict) and mine.get("engine") in ("torch", "onnx"):
        return mine["engine"]
    x = np.random.default_rng(0).integers(0, 256, (256, prep.channels, 50, 50), dtype=np.uint8)
    rates = {
        "torch": _rate(TorchBackend(_model(path), prep), x),
        "onnx": _rate(onnx_backend(path), x),
    }
    engine = max(rates, key=rates.get)
    logger.info(
        "engine: %s (torch %.0f, onnx %.0f patches/s here)", engine, rates["torch"], rates["onnx"]
    )
    known[machine] = {"engine": engine, **rates}
    with contextlib.suppress(OSError):  # a cache we may not write: time again next run
        write_atomic(private_dir(record.parent) / ENGINE_RECORD, json.dumps(known, indent=1))
    return engine


def _machine() -> str:
    """What the engine timing depends on: the CPU, the cores this process may use and the
    thread count the user set for torch's OpenMP (read without importing torch)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    return f"{_cpu_name()}; {usable_cpus()} cores" + (f"; OMP_NUM_THREADS={omp}" if omp else "")


def _json_dict(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _rate(backend, x: np.ndarray, repeat: int = 3) -> float:
    backend.logits(x[:64])  # warm-up: kernels are prepared on first use
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        backend.logits(x)
        best = max(best, len(x) / (time.perf_counter() - start))
    return best


def _cpu_name() -> str:
    try:
        with Path("/proc/cpuinfo").open() as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or str(os.cpu_count())
