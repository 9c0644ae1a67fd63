"""How the CLI fails: exit codes, one-line errors, a full disk, and checks before imports.

The exit codes (``cli.app``): 0 every input scored, 1 error, 2 wrong command line,
3 some inputs skipped, 4 none scored. Errors are one line on stderr naming the file.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.cli.app import EXIT_ERROR, EXIT_NONE_SCORED, EXIT_SKIPPED, EXIT_USAGE
from tests.conftest import write_patch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _python(script: str, **kwargs) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter that imports this checkout's idcscope."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True, text=True, env=env, timeout=300, **kwargs,
    )  # fmt: skip


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def good(tmp_path) -> Path:
    return write_patch(tmp_path / "in" / "p1_idx5_x50_y100_class0.png")


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "in" / "notes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a patch\n")
    return path


# ----------------------------------------------------------------------------- before imports


def test_a_wrong_path_fails_before_any_heavy_import(tmp_path):
    res = _python(
        f"""
        import sys
        from idcscope.cli import app
        try:
            app(["predict", "{tmp_path / "nowhere"}", "--out", "x.csv"], prog_name="idcscope")
        except SystemExit as e:
            code = e.code
        heavy = ("torch", "pandas", "onnxruntime", "scipy", "matplotlib", "numba")
        print(code, sorted(m for m in heavy if m in sys.modules))
        """
    )
    assert res.stdout.split("\n")[-2] == f"{EXIT_USAGE} []", res.stdout + res.stderr
    assert "nowhere" in _one_error_line(res.stderr)


def test_one_patch_is_scored_without_the_heavy_libraries(good, tmp_path):
    """What scoring one patch needs, and no more: no plotting, no numba compiler, no zoo."""
    res = _python(
        f"""
        import sys
        from idcscope.cli import app
        try:
            app(["predict", "{good}", "--out", "{tmp_path / "p.csv"}", "--engine", "torch"],
                prog_name="idcscope")
        except SystemExit as e:
            code = e.code
        heavy = ("numba", "matplotlib", "sklearn", "skimage", "timm", "torchvision")
        print(code, sorted(m for m in heavy if m in sys.modules))
        """
    )
    assert res.stdout.split("\n")[-2] == "0 []", res.stdout + res.stderr


def test_out_naming_a_folder_is_a_usage_error(good, tmp_path):
    res = _run("predict", str(good), "--out", str(tmp_path))
    assert res.exit_code == EXIT_USAGE
    assert "is a folder" in _one_error_line(res.stderr)


def test_out_folder_is_made(good, tmp_path):
    out = tmp_path / "new" / "deeper" / "p.csv"
    res = _run("predict", str(good), "--out", str(out), "--engine", "torch")
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out)) == 1


def test_resume_without_last_checkpoint_names_it(good, tmp_path):
    run = tmp_path / "run"
    res = _run("train", str(good.parent), "--out", str(run), "--resume")
    assert res.exit_code == EXIT_USAGE
    assert str(run / "last.pt") in _one_error_line(res.stderr)
    assert not run.exists()  # nothing started


def test_help_tells_the_exit_codes():
    assert "Exit codes" in _run("--help").stdout
    assert "Exit codes" in _run("predict", "--help").stdout


# ----------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_nothing_scored_is_exit_4(command, text_file, tmp_path):
    out = tmp_path / ("p.csv" if command == "predict" else "panels")
    res = _run(command, str(text_file), "--out", str(out), "--engine", "torch")
    assert res.exit_code == EXIT_NONE_SCORED, res.output
    assert "none of the 1 inputs" in _one_error_line(res.stderr)


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_some_skipped_is_exit_3(command, good, tmp_path):
    (good.parent / "p1_idx5_x100_y100_class0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / ("p.csv" if command == "predict" else "panels")
    res = _run(command, str(good.parent), "--out", str(out), "--engine", "torch")
    assert res.exit_code == EXIT_SKIPPED, res.output
    assert "1 of 2 inputs could not be read" in res.stderr
    assert "error:" not in res.stderr


def test_evaluate_of_unreadable_files_only_is_exit_4(tmp_path):
    bad = tmp_path / "data" / "p1" / "1" / "p1_idx5_x50_y50_class1.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    res = _run(
        "evaluate", str(tmp_path / "data"), "--out", str(tmp_path / "r"), "--engine", "torch"
    )
    assert res.exit_code == EXIT_NONE_SCORED, res.output
    assert "none of the" in _one_error_line(res.stderr)


def test_an_unexpected_error_is_one_line_and_its_traceback_needs_v(good, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("idcscope.inference.predict.predict", broken)
    res = _run("predict", str(good), "--out", str(tmp_path / "p.csv"))
    assert res.exit_code == EXIT_ERROR
    assert _one_error_line(res.stderr) == "idcscope: error: RuntimeError: boom"
    res = _run("-v", "predict", str(good), "--out", str(tmp_path / "p.csv"))
    assert res.exit_code == EXIT_ERROR
    assert "Traceback" in res.stderr and "boom" in res.stderr


# ----------------------------------------------------------------------------- a full disk


def _full_disk_after(monkeypatch, budget: int) -> None:
    """Writes of predict's CSV fail with ENOSPC once ``budget`` bytes are in, the last one
    part written, as a full disk does."""
    left = [budget]

    def write_all(fd: int, data: bytes) -> None:
        os.lseek(fd, 0, os.SEEK_END)
        n = min(len(data), left[0])
        os.write(fd, data[:n])
        left[0] -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("idcscope.inference.predict._write_all", write_all)


def _busy_tasks(monkeypatch) -> list[int]:
    """A count of the worker tasks queued or running, kept up to date."""
    from idcscope.inference.workers import Workers

    busy, lock, submit = [0], threading.Lock(), Workers.submit

    def counted(self, priority, fn, *args):
        def run(*a):
            try:
                return fn(*a)
            finally:
                with lock:
                    busy[0] -= 1

        with lock:
            busy[0] += 1
        return submit(self, priority, run, *args)

    monkeypatch.setattr(Workers, "submit", counted)
    return busy


def test_a_full_disk_stops_predict_with_whole_rows_and_no_work_left(
    synthetic_root, tmp_path, monkeypatch
):
    from idcscope.inference import predict as library
    from idcscope.inference.stream import FileSource

    monkeypatch.setattr("idcscope.inference.stream.BUCKET", 60)  # several buckets here
    _full_disk_after(monkeypatch, budget=16_000)  # the first bucket fits, not the next
    busy, real_load, real_predict, at_error = (
        _busy_tasks(monkeypatch),
        FileSource.load,
        library.predict,
        [],
    )

    calls = [0]

    def slow_load(self, rows):  # the buckets after the first two outlast the failed write
        calls[0] += 1
        if calls[0] > 2:
            time.sleep(1.5)
        return real_load(self, rows)

    def watched(*args, **kwargs):
        try:
            return real_predict(*args, **kwargs)
        except Exception:
            at_error.append(busy[0])
            raise

    monkeypatch.setattr(FileSource, "load", slow_load)
    monkeypatch.setattr(library, "predict", watched)
    out = tmp_path / "p.csv"
    res = _run("predict", str(synthetic_root), "--out", str(out), "--engine", "torch")
    assert at_error == [0]  # the buckets in flight were stopped and waited for
    assert res.exit_code == EXIT_ERROR, res.output
    line = _one_error_line(res.stderr)
    assert str(out) in line and os.strerror(errno.ENOSPC) in line
    kept = pd.read_csv(out)  # whole rows: every one parses, with its probability
    n_files = len(list(synthetic_root.rglob("*.png")))
    assert 0 < len(kept) < n_files
    assert kept["prob_idc"].between(0, 1).all() and kept["pred"].isin([0, 1]).all()
    assert f"keeps the {len(kept)} whole rows" in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a full disk")
def test_a_full_disk_exits_1_with_one_line_from_the_console_script(synthetic_root, tmp_path):
    """The real command, its file size limited as a full disk limits it: exit 1 (no abort
    from worker threads left running), one line, the rows written whole."""
    out = tmp_path / "p.csv"
    script = f"""
        import resource, signal, sys
        import idcscope.inference.stream as stream
        from idcscope.cli import app
        from idcscope.inference import Predictor
        from idcscope.models.bundle import DEFAULT_MODEL, resolve_model
        Predictor(resolve_model(DEFAULT_MODEL))  # the graph and engine cached: only the CSV grows
        stream.BUCKET = 60
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))  # the first bucket fits
        sys.argv = ["idcscope", "predict", "{synthetic_root}", "--out", "{out}"]
        app(prog_name="idcscope")
        """
    res = _python(script, cwd=tmp_path)
    assert res.returncode == EXIT_ERROR, res.stderr
    line = _one_error_line(res.stderr)
    assert str(out) in line and "write failed" in line
    kept = pd.read_csv(out)
    assert len(kept) > 0 and kept["prob_idc"].between(0, 1).all()


# ----------------------------------------------------------------------------- logging


def test_other_libraries_stay_quiet_below_warning(tmp_path):
    script = f"""
        import logging
        import idcscope.data.synthetic as synthetic
        from idcscope.cli import app

        def noisy(out, **kwargs):
            logging.getLogger("torch.onnx").info("exporter pass noise")
            chatty = logging.getLogger("onnxscript.rewriter")
            chatty.setLevel(logging.INFO)  # as some libraries do
            chatty.info("rewrite noise")
            logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
            logging.getLogger("matplotlib").warning("a real warning")
            return {{"n_patches": 1, "n_positive": 0}}

        synthetic.make_synthetic_dataset = noisy
        app(["synth", "{tmp_path / "s"}"], prog_name="idcscope")
        """
    res = _python(script)
    assert res.returncode == 0, res.stderr
    said = res.stdout + res.stderr
    assert "1 patches (0 IDC)" in said  # idcscope's own INFO
    assert "a real warning" in said
    for noise in ("exporter pass noise", "rewrite noise", "fontManager"):
        assert noise not in said


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a full disk")
def test_a_graph_that_cannot_be_written_names_its_file(tmp_path):
    """Exporting into a full cache stops with one line naming the graph, not a bare OSError."""
    script = f"""
        import resource, signal, sys
        from idcscope.inference.export import export_onnx
        from idcscope.models.bundle import DEFAULT_MODEL, resolve_model
        from idcscope.errors import IdcscopeError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))
        try:
            export_onnx(resolve_model(DEFAULT_MODEL), "{tmp_path / "g.onnx"}")
        except IdcscopeError as e:
            print(e)
        """
    res = _python(script, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(f"{tmp_path / 'g.onnx'}: write failed")


@pytest.mark.parametrize(
    "command", ["predict", "evaluate", "ensemble", "explain", "heatmap", "slide", "serve"]
)
def test_every_scoring_command_calls_at_the_alpha_asked_and_refuses_one_not_fitted(
    command, good, tmp_path
):
    """``--alpha`` reaches the one Predictor from every command that scores: an alpha the
    model has no band for stops it before anything is scored, naming the model and the
    alphas there are."""
    folder = good.parent  # the arguments need only exist: the model is refused first
    args = {
        "predict": [str(good), "--out", str(tmp_path / "p.csv")],
        "evaluate": [str(folder), "--out", str(tmp_path / "e")],
        "ensemble": [str(folder), "--out", str(tmp_path / "e"),
                     "--model", "idc-default", "--model", "idc-default"],
        "explain": [str(good), "--out", str(tmp_path / "x")],
        "heatmap": [str(folder), "--out", str(tmp_path / "h")],
        "slide": [str(good), "--out", str(tmp_path / "s")],
        "serve": [],
    }[command]  # fmt: skip
    res = _run(command, *args, "--alpha", "0.03")
    assert res.exit_code == EXIT_ERROR, res.output
    assert "idc-default: its uncertain bands were fitted at alpha" in res.output
    assert "0.05, 0.1, 0.2, not 0.03" in res.output
    assert not any(tmp_path.rglob("*.csv"))  # nothing scored
