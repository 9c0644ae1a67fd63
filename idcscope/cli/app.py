"""The ``idcscope`` app, its shared options, its exit codes and how a command fails or logs.

Every command that scores (predict, explain, evaluate, ensemble, heatmap, slide) ends with
one of the exit codes below, so a script or CI job can tell a clean run from one that left
inputs out. Errors are one line on stderr, ``idcscope: error: ...`` naming the file; the
traceback only with ``-v``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

EXIT_OK = 0  # every input scored
EXIT_ERROR = 1  # the command could not run: unreadable model, failed write, any error
EXIT_USAGE = 2  # the command line is wrong: unknown option, missing or wrong path (Click's)
EXIT_SKIPPED = 3  # done, but some inputs could not be read; their rows or skipped.csv say why
EXIT_NONE_SCORED = 4  # no input could be scored (all unreadable)

EXIT_CODES_HELP = (
    "Exit codes: 0 every input scored; 1 error (the message names the file); "
    "2 wrong command line (unknown option, missing path, --out a folder); "
    "3 some inputs could not be read (their rows say why); 4 none could be scored."
)

logger = logging.getLogger("idcscope")


class _Commands(TyperGroup):
    """The group every command runs in: it sets up logging for the run, turns any error a
    command lets out into one line (the traceback under ``-v``) and usage errors into one
    line too, and leaves Click's exit codes (2 for the command line) as they are."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as e:  # Click's, vendored by Typer: the command line
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError":  # as Typer tells it (no public class)
                typer.echo(ctx.get_help())
                code = e.exit_code
            else:
                where = ctx.command_path if ctx else "idcscope"
                typer.echo(f"{where}: error: {e.format_message()} (see --help)", err=True)
                code = e.exit_code
        except typer.Abort:
            typer.echo("idcscope: aborted", err=True)
            code = EXIT_ERROR
        if args is None:  # the real command line (a test runner passes its arguments)
            # No last sweep of the half a million objects torch, ONNX Runtime and the rest
            # made: the interpreter's exit took 0.5 s of a 2.5 s one-patch predict. What
            # idcscope writes is closed by then; nothing relies on a finaliser in a cycle.
            gc.freeze()
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    def invoke(self, ctx: typer.Context):
        with _logging(bool(ctx.params.get("verbose"))):
            try:
                return super().invoke(ctx)
            except (typer.Exit, typer.TyperException, typer.Abort):
                raise
            except Exception as e:  # one line, whatever went wrong; the traceback under -v
                logger.debug("traceback", exc_info=e)
                raise fail(e) from e


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Detect invasive ductal carcinoma (IDC) in H&E breast histopathology patches. "
    "Research use only: not a medical device.\n\n" + EXIT_CODES_HELP,
)


class _OneLine(logging.Handler):
    """Warnings and errors as one plain line on stderr (the ``sys.stderr`` of the moment,
    so a test runner's capture sees them): ``idcscope: error: MESSAGE``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            origin = "" if record.name.split(".")[0] == "idcscope" else f"[{record.name}] "
            line = f"idcscope: {record.levelname.lower()}: {origin}{record.getMessage()}"
            print(line, file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """idcscope's own records at INFO (DEBUG with ``-v``) to stderr, warnings and errors as
    one line; other libraries' at WARNING only (the ONNX exporter and matplotlib tell of
    their passes and font caches at INFO). Undone afterwards: a test runner or a later
    command in the same process keeps its own setup."""
    from rich.console import Console
    from rich.logging import RichHandler

    own = logging.getLogger("idcscope")
    level = logging.DEBUG if verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0:
        level = logging.WARNING  # rank 0 speaks for a distributed run
    chatter = RichHandler(console=Console(stderr=True), show_path=False, level=logging.DEBUG)
    chatter.addFilter(lambda r: r.levelno < logging.WARNING and r.name.split(".")[0] == "idcscope")
    chatter.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    alarms = _OneLine(logging.WARNING)
    root, before = logging.getLogger(), own.level
    own.setLevel(min(level, before) if before else level)
    root.addHandler(chatter)
    root.addHandler(alarms)
    try:
        yield
    finally:
        root.removeHandler(chatter)
        root.removeHandler(alarms)
        own.setLevel(before)


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug messages, and tracebacks of errors.")
    ] = False,
) -> None:
    """Logging is set up by the group around the command, from ``-v`` (``_logging``)."""


Recipe = Annotated[str, typer.Option(help="Preset: 'default' (ours) or 'report' (the study's).")]
Threads = Annotated[int, typer.Option(help="Torch CPU threads (0: all cores).")]
ConfigFile = Annotated[Path | None, typer.Option(help="YAML file of config values.")]
ModelName = Annotated[str | None, typer.Option(help="Model name (see `idcscope models`).")]
Epochs = Annotated[int | None, typer.Option()]
Seed = Annotated[int | None, typer.Option()]
Model = Annotated[
    str | None,
    typer.Option(
        help="A bundled model's name (`idcscope models`), a checkpoint (.pt, .onnx), a model "
        "folder or hf://owner/name. Default: the model that ships with idcscope."
    ),
]
# exists=True: Click checks the paths before the command imports anything (under a second).
DataDirs = Annotated[
    list[Path],
    typer.Argument(exists=True, help="Dataset folders; several are merged by patient id."),
]
Inputs = Annotated[list[Path], typer.Argument(exists=True, help="Patch files or folders.")]
Tta = Annotated[bool, typer.Option(help="Average the 8 dihedral transforms.")]
ReportDir = Annotated[Path, typer.Option(help="Folder for metrics.json, plots and report.html.")]
Engine = Annotated[
    str,
    typer.Option(
        help="auto|torch|onnx: where the model runs (auto: the faster here, timed once per "
        "checkpoint; onnx: ONNX Runtime, its graph exported once into the user's cache).",
    ),
]
CallAlpha = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        help="The uncertain band to call with: the largest share of each class's decided "
        "patches called wrong, one of the alphas the model was fitted at (idc-default: "
        "0.01, 0.02, 0.05, 0.1, 0.2); default: the model's own, 0.05.",
    ),
]
Context = Annotated[
    bool,
    typer.Option(
        "--context/--no-context",
        help="Use each patch's place (from the coordinates in the file names): the "
        "neighbours the model sees and the smoothing of logits over the grid, as the "
        "checkpoint was trained and fitted; --no-context scores every patch alone.",
    ),
]


def model_path(spec: str | None) -> Path:
    """The model ``--model`` names (the bundled one when None), or the exit that says why not."""
    from ..errors import IdcscopeError
    from ..models.bundle import DEFAULT_MODEL, resolve_model

    try:
        return resolve_model(spec or DEFAULT_MODEL)
    except IdcscopeError as e:
        raise fail(e) from e


def data_arg(folders: list[Path]) -> str | list[str]:
    """The config's ``data``: one folder as a string, several as a list."""
    return str(folders[0]) if len(folders) == 1 else [str(f) for f in folders]


def out_file(out: Path) -> Path:
    """``--out`` as a file to write: its folder made if missing; a folder is a usage error."""
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; name a file in it", param_hint="--out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise typer.BadParameter(f"cannot make {out.parent}: {e.strerror}", "--out") from e
    return out


def out_folder(out: Path) -> Path:
    """``--out`` as a folder to write in: a file there is a usage error."""
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file; name a folder", param_hint="--out")
    return out


def describe(e: BaseException) -> str:
    """``e`` in one line that names the file, as ``idcscope: error:`` prints it."""
    from ..errors import IdcscopeError

    if isinstance(e, IdcscopeError):
        text = str(e)
    elif isinstance(e, OSError) and e.filename:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def fail(e: BaseException) -> typer.Exit:
    """Log ``e`` as the reason the command stops (one line), and the exit to raise: 4 when
    nothing could be scored, else 1."""
    from ..errors import NothingScoredError

    logger.error("%s", describe(e))
    return typer.Exit(EXIT_NONE_SCORED if isinstance(e, NothingScoredError) else EXIT_ERROR)


def scored_exit(n_scored: int, n_skipped: int, where: str) -> None:
    """End a scoring command with its exit code: 0 when every input was scored, 3 when
    some were skipped, 4 when none could be (said once, naming ``where`` the reasons are)."""
    if n_skipped == 0:
        return
    total = n_scored + n_skipped
    if n_scored == 0:
        logger.error("none of the %d inputs could be scored; the reasons are in %s", total, where)
        raise typer.Exit(EXIT_NONE_SCORED)
    logger.warning(
        "%d of %d inputs could not be read; the reasons are in %s", n_skipped, total, where
    )
    raise typer.Exit(EXIT_SKIPPED)


def print_headline(m: dict) -> None:
    keys = (
        "auc",
        "pr_auc",
        "balanced_accuracy",
        "f1",
        "precision",
        "recall",
        "specificity",
        "accuracy",
        "majority_baseline_accuracy",
        "threshold",
        "n",
        "n_patients",
    )
    for k in keys:
        v = m.get(k)
        print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")
    calls = m.get("calls", {})
    for k in ("coverage", "sensitivity_decided", "specificity_decided"):
        if k in calls:  # the three-way calls: how many decided, how right
            v = calls[k]
            print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")


@contextlib.contextmanager
def log_to_file(run_dir: Path) -> Iterator[None]:
    """Copy every log record to ``run_dir/train.log`` while the block runs; the handler
    leaves the root logger afterwards (a later command in the same process keeps none)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
