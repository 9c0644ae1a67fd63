"""Code that runs on Linux alone has one home, with a fallback for macOS and Windows; a
patch is scored without importing what scoring it does not need."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import idcscope
from idcscope.cpus import usable_cpus


def test_usable_cpus_without_affinity(monkeypatch):
    """macOS and Windows have no ``os.sched_getaffinity``: the count comes from elsewhere."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)
    assert usable_cpus() == 3
    monkeypatch.delattr(os, "process_cpu_count")
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable" is allowed
    assert usable_cpus() == 1


def test_affinity_is_read_in_one_place():
    package = Path(idcscope.__file__).parent
    users = sorted(
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if "sched_getaffinity" in p.read_text()
    )
    assert users == ["cpus.py"]


def test_scoring_from_a_cached_graph_imports_no_torch(tmp_path):
    """Once the shipped model's ONNX graph is in the user's cache, `predict` of a patch
    runs without torch (2 s of the 3 s a patch took) and gives the same row."""
    rng = np.random.default_rng(0)
    png = tmp_path / "p1" / "1" / "p1_idx5_x100_y200_class1.png"
    png.parent.mkdir(parents=True)
    Image.fromarray(rng.integers(120, 250, (50, 50, 3), dtype=np.uint8)).save(png)
    env = {**os.environ, "IDCSCOPE_CACHE": str(tmp_path / "cache")}

    def predict(out: str, prelude: str = "") -> subprocess.CompletedProcess:
        args = ["idcscope", "predict", str(png), "--engine", "onnx", "--out", str(tmp_path / out)]
        script = f"{prelude}import sys; from idcscope.cli import app; sys.argv = {args!r}; app()"
        return subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )

    warm = predict("warm.csv")  # exports the graph into the cache
    assert warm.returncode == 0, warm.stderr
    cold = predict("cold.csv", prelude="import sys; sys.modules['torch'] = None; ")
    assert cold.returncode == 0, cold.stderr
    assert (tmp_path / "cold.csv").read_text() == (tmp_path / "warm.csv").read_text()
