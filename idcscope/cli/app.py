"""The ``idcscope`` app, its shared options and how a command fails or logs to a file."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Detect invasive ductal carcinoma (IDC) in H&E breast histopathology patches. "
    "Research use only: not a medical device.",
)
logger = logging.getLogger("idcscope")

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
DataDirs = Annotated[
    list[Path], typer.Argument(help="Dataset folders; several are merged by patient id.")
]
Tta = Annotated[bool, typer.Option(help="Average the 8 dihedral transforms.")]
ReportDir = Annotated[Path, typer.Option(help="Folder for metrics.json, plots and report.html.")]
Engine = Annotated[
    str,
    typer.Option(
        help="auto|torch|onnx: where the model runs (auto: the faster here, timed once per "
        "checkpoint; onnx: ONNX Runtime, the graph cached beside the checkpoint)."
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


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0:
        level = logging.WARNING  # rank 0 speaks for a distributed run
    logging.basicConfig(
        level=level, format="%(message)s", datefmt="[%X]", handlers=[RichHandler(show_path=False)]
    )


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


def fail(e: Exception) -> typer.Exit:
    """Log ``e`` as the reason the command stops, and the exit to raise."""
    logger.error("%s", e)
    return typer.Exit(code=1)


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
