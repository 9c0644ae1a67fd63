"""Killed runs: atomic writes, SIGKILL and resume, divergence, reproducibility.

A training subprocess is SIGKILLed at chosen points and resumed; the resumed run must end
exactly where an uninterrupted run with the same seed ends, having lost at most the epoch
that was in progress. Deterministic kill points are armed inside the subprocess (it kills
itself with SIGKILL, so nothing gets to clean up); one run is killed from outside.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from idcscope.data import splits as splitting
from idcscope.errors import IdcscopeError
from idcscope.models.checkpoint import read_checkpoint, save_checkpoint, update_checkpoint
from idcscope.training.config import make_config
from idcscope.training.train import train

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
KILL_ENV = "IDCSCOPE_TEST_KILL_AT"
TIMING = ("images_per_s", "seconds")  # the only history fields allowed to differ


# ----------------------------------------------------------------------------- kill points


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm_kill_point() -> None:
    """In the training subprocess: SIGKILL ourselves at the point ``$IDCSCOPE_TEST_KILL_AT`` names.

    ``decoding``: half-way through decoding the patch cache.
    ``batch:E:B``: just before training on batch B of epoch E.
    ``writing-last:E``: half-way through writing ``last.pt`` at the end of epoch E.
    ``finalize``: after the last epoch, before the threshold is stored.
    """
    point = os.environ.get(KILL_ENV, "")
    if point == "decoding":
        import idcscope.data.decode as decode

        real_decode = decode.decode_into

        def decode_half(paths, out):
            real_decode(paths[: len(paths) // 2], out)
            _die()

        decode.decode_into = decode_half
    elif point.startswith("batch:"):
        import idcscope.training.loop as engine

        epoch, batch = map(int, point.split(":")[1:])
        real_iter = engine.PatchLoader.__iter__

        def iterate(self):
            for i, item in enumerate(real_iter(self)):
                if (self.epoch + 1, i + 1) == (epoch, batch):
                    _die()
                yield item

        engine.PatchLoader.__iter__ = iterate
    elif point.startswith("writing-last:"):
        epoch = int(point.split(":")[1])
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if getattr(f, "name", "").endswith(".last.pt.tmp") and obj.get("epoch") == epoch:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                _die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif point == "finalize":
        import idcscope.training.train as train_module

        train_module.finalize = lambda *args, **kwargs: _die()
    elif point:
        raise ValueError(f"unknown kill point {point!r}")


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from idcscope.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root, n_patients=5, grid=(6, 6), seed=1)
    return root


def _args(data: Path, out: Path) -> list[str]:
    return [
        *("train", str(data), "--out", str(out), "--epochs", str(EPOCHS)),
        *("--batch-size", "32", "--threads", "1", "--seed", "0"),
    ]


def _config(data: Path, out: Path, **kw):
    values = {"epochs": EPOCHS, "batch_size": 32, "threads": 1, "seed": 0}
    return make_config("default", data=str(data), out=str(out), **{**values, **kw})


def _env(cache: Path, kill_at: str = "") -> dict[str, str]:
    env = {**os.environ, "IDCSCOPE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env[KILL_ENV] = kill_at
    return env


def _killed_at(point: str, data: Path, out: Path, cache: Path) -> None:
    """``python -m idcscope train`` with a kill point armed; it must die by SIGKILL."""
    arm_then_main = (
        "import tests.test_killed_runs as t; t.arm_kill_point(); "
        "import runpy; runpy.run_module('idcscope', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", arm_then_main, *_args(data, out)],
        cwd=REPO,
        env=_env(cache, point),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _history(run: Path) -> list[dict]:
    rows = read_checkpoint(run / "last.pt")["history"]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _assert_same_run(run: Path, reference: Path) -> None:
    """Same weights, same history, same threshold and temperature as the reference run."""
    for name in ("best.pt", "last.pt"):
        got, want = read_checkpoint(run / name), read_checkpoint(reference / name)
        assert got["epoch"] == want["epoch"], name
        for key, tensor in want["state_dict"].items():
            torch.testing.assert_close(got["state_dict"][key], tensor, rtol=0, atol=1e-7)
        for key in ("threshold", "temperature", "best_epoch"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (name, key)
    got, want = _history(run), _history(reference)
    assert len(got) == len(want) == EPOCHS
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key, value in w.items():
            assert g[key] == (value if value is None else pytest.approx(value, rel=1e-6)), key
    with (run / "history.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == [str(e + 1) for e in range(EPOCHS)]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run, in process."""
    out = tmp_path_factory.mktemp("reference")
    train(_config(data_dir, out / "run", cache_dir=str(out / "cache")))
    return out / "run"


def _resume(data: Path, run: Path, cache: Path, caplog) -> None:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="idcscope.training.train"):
        train(_config(data, run, cache_dir=str(cache)), resume=True)


def _resumed_at_epoch(caplog) -> int | None:
    for record in caplog.records:
        if record.getMessage().startswith("resuming"):
            return int(record.getMessage().rsplit(" ", 1)[1])
    return None


# ----------------------------------------------------------------------------- killed and resumed


def test_killed_while_decoding_the_cache(data_dir, reference, tmp_path, caplog):
    run, cache = tmp_path / "run", tmp_path / "cache"
    _killed_at("decoding", data_dir, run, cache)
    assert not list(cache.glob("*/meta.json"))  # the half-written cache is not marked complete
    assert not (run / "last.pt").exists()
    _resume(data_dir, run, cache, caplog)
    assert _resumed_at_epoch(caplog) is None  # nothing to resume: started over
    _assert_same_run(run, reference)


def test_killed_in_the_middle_of_an_epoch(data_dir, reference, tmp_path, caplog):
    run, cache = tmp_path / "run", tmp_path / "cache"
    _killed_at("batch:2:2", data_dir, run, cache)
    assert read_checkpoint(run / "last.pt")["epoch"] == 1  # only the epoch in progress is lost
    _resume(data_dir, run, cache, caplog)
    assert _resumed_at_epoch(caplog) == 2
    _assert_same_run(run, reference)


def test_killed_while_writing_a_checkpoint(data_dir, reference, tmp_path, caplog):
    run, cache = tmp_path / "run", tmp_path / "cache"
    _killed_at("writing-last:2", data_dir, run, cache)
    assert (run / ".last.pt.tmp").stat().st_size > 0  # the write was really cut short
    assert read_checkpoint(run / "last.pt")["epoch"] == 1  # and the old checkpoint stands
    _resume(data_dir, run, cache, caplog)
    assert _resumed_at_epoch(caplog) == 2
    assert not (run / ".last.pt.tmp").exists()
    _assert_same_run(run, reference)


def test_killed_before_the_threshold_is_chosen(data_dir, reference, tmp_path, caplog):
    run, cache = tmp_path / "run", tmp_path / "cache"
    _killed_at("finalize", data_dir, run, cache)
    last = read_checkpoint(run / "last.pt")
    assert last["epoch"] == EPOCHS and "threshold" not in last
    _resume(data_dir, run, cache, caplog)
    assert _resumed_at_epoch(caplog) == EPOCHS + 1  # no epoch trained again
    _assert_same_run(run, reference)


def test_killed_from_outside_once_epoch_1_is_saved(data_dir, reference, tmp_path):
    """Plain ``python -m idcscope train``, SIGKILLed as soon as last.pt appears; ``--resume``."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "idcscope", *_args(data_dir, run)],
        cwd=REPO,
        env=_env(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL  # it was still running
    done = read_checkpoint(run / "last.pt")["epoch"]
    assert 1 <= done < EPOCHS
    resumed = subprocess.run(
        [sys.executable, "-m", "idcscope", *_args(data_dir, run), "--resume"],
        cwd=REPO,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run} at epoch {done + 1}" in (run / "train.log").read_text()
    _assert_same_run(run, reference)


# ----------------------------------------------------------------------------- atomic writes


def _model() -> torch.nn.Module:
    return torch.nn.Linear(3, 2)


def test_checkpoint_is_written_beside_and_renamed(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    old = _model()
    save_checkpoint(path, old, epoch=1)
    real_save, targets = torch.save, []

    def crash_half_way(obj, f, *args, **kwargs):
        targets.append(Path(f.name))
        # While the new checkpoint is being written, the old one is still whole at its name.
        assert read_checkpoint(path)["epoch"] == 1
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:100])
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _model(), epoch=2)
    assert targets and targets[0] != path and targets[0].parent == path.parent
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 1
    torch.testing.assert_close(ckpt["state_dict"]["weight"], old.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no half file left over


def test_update_interrupted_keeps_the_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "best.pt", _model(), epoch=3)

    def killed(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        update_checkpoint(path, threshold=0.3)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 3 and "threshold" not in read_checkpoint(path)


def test_stale_temp_file_of_a_killed_writer_is_replaced(tmp_path):
    (tmp_path / ".last.pt.tmp").write_bytes(b"half a checkpoint from a killed run")
    save_checkpoint(tmp_path / "last.pt", _model(), epoch=4)
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    assert not (tmp_path / ".last.pt.tmp").exists()


def test_split_file_interrupted_keeps_the_old_one(tmp_path, monkeypatch):
    path = splitting.save_splits({"train": ["a"], "val": ["b"], "test": ["c"]}, tmp_path / "s.json")
    real_write = Path.write_text

    def killed_mid_write(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        splitting.save_splits({"train": ["x"], "val": ["y"], "test": ["z"]}, path)
    monkeypatch.undo()
    assert splitting.load_splits(path)["train"] == ["a"]


@pytest.mark.parametrize("damage", ["truncated pixels", "corrupt meta", "missing flags"])
def test_damaged_patch_cache_is_decoded_again(damage, tmp_path, caplog):
    from idcscope.data.cache import load_or_build
    from idcscope.data.manifest import index_dataset
    from tests.conftest import write_patch

    for k in range(3):
        write_patch(
            tmp_path / "d" / "7" / "0" / f"7_idx5_x{50 * k + 1}_y1_class0.png", color=(k, 9, 9)
        )
    ix = index_dataset(tmp_path / "d")
    first = load_or_build(ix.root, ix.table, tmp_path / "c", workers=1)
    expected = np.array(first.images)
    folder = next((tmp_path / "c").iterdir())
    if damage == "truncated pixels":
        (folder / "patches.u8").write_bytes(b"\0" * 10)
    elif damage == "corrupt meta":
        (folder / "meta.json").write_text("{")
    else:
        (folder / "ok.npy").unlink()
    again = load_or_build(ix.root, ix.table, tmp_path / "c", workers=1)
    assert "damaged" in caplog.text
    np.testing.assert_array_equal(np.asarray(again.images), expected)
    assert again.ok.all()
    assert json.loads((folder / "meta.json").read_text())["n"] == 3


# ----------------------------------------------------------------------------- divergence


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    import idcscope.training.train as train_module

    real, epochs_started = train_module.train_one_epoch, []

    def nan_in_epoch_2(net, loader, optimizer, scheduler, loss_fn, *args, **kwargs):
        epochs_started.append(loader.epoch)
        if loader.epoch == 1:
            real_loss = loss_fn

            def loss_fn(logits, y):
                return real_loss(logits, y) * float("nan")

        return real(net, loader, optimizer, scheduler, loss_fn, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", nan_in_epoch_2)
    run = tmp_path / "run"
    with pytest.raises(IdcscopeError, match=r"diverged in epoch 2.*loss became nan") as e:
        train(_config(data_dir, run, cache_dir=str(tmp_path / "cache")))
    assert f"{run / 'last.pt'} (epoch 1) is the last good checkpoint" in str(e.value)
    assert epochs_started == [0, 1]
    for name in ("last.pt", "best.pt"):
        ckpt = read_checkpoint(run / name)
        assert ckpt["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    with (run / "history.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 1


def test_huge_learning_rate_stops_before_any_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(IdcscopeError, match=r"diverged in epoch 1: .*no checkpoint was written"):
        train(_config(data_dir, run, lr=1e30, batch_size=16, cache_dir=str(tmp_path / "cache")))
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


# ----------------------------------------------------------------------------- reproducibility


def test_same_seed_same_run(data_dir, reference, tmp_path):
    again = tmp_path / "run"
    train(_config(data_dir, again, cache_dir=str(tmp_path / "cache")))
    _assert_same_run(again, reference)
    want = read_checkpoint(reference / "last.pt")["history"]
    got = read_checkpoint(again / "last.pt")["history"]
    for g, w in zip(got, want, strict=True):  # exactly, not just closely
        assert {k: g[k] for k in g if k not in TIMING} == {k: w[k] for k in w if k not in TIMING}


def test_another_seed_another_run(data_dir, reference, tmp_path):
    other = tmp_path / "run"
    train(_config(data_dir, other, epochs=1, seed=1, cache_dir=str(tmp_path / "cache")))
    a = read_checkpoint(other / "last.pt")["history"][0]["train_loss"]
    b = read_checkpoint(reference / "last.pt")["history"][0]["train_loss"]
    assert not math.isclose(a, b, rel_tol=1e-6)  # so the comparisons above can fail
