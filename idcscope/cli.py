"""The ``idcscope`` command: one function per subcommand, heavy imports inside each."""

from __future__ import annotations

import json
import logging
import os
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


def _fail(e: Exception) -> typer.Exit:
    logger.error("%s", e)
    return typer.Exit(code=1)


@app.command()
def index(
    data_dir: Path,
    out: Annotated[Path | None, typer.Option(help="Write the manifest as CSV.")] = None,
) -> None:
    """Index a dataset folder and print what is in it."""
    from .data.manifest import index_dataset, summarize
    from .errors import IdcscopeError

    try:
        ix = index_dataset(data_dir)
    except IdcscopeError as e:
        raise _fail(e) from e
    if out:
        ix.table.to_csv(out, index=False)
    print(
        json.dumps(
            {**summarize(ix.table), "layout": ix.layout, "n_skipped": len(ix.skipped)}, indent=2
        )
    )


@app.command()
def train(
    data_dir: Path,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, history, config.")],
    model: Annotated[str | None, typer.Option(help="Model name (see `idcscope models`).")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    recipe: Recipe = "default",
    config: Annotated[Path | None, typer.Option(help="YAML file of config values.")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    augment: Annotated[str | None, typer.Option(help="none|dihedral|report|default|strong")] = None,
    imbalance: Annotated[
        str | None, typer.Option(help="class_weight|balanced_sampler|focal|none")
    ] = None,
    stain: Annotated[str | None, typer.Option(help="none|reinhard|macenko, per patient.")] = None,
    keep: Annotated[
        str | None, typer.Option(help="last|val_loss: the epoch best.pt holds.")
    ] = None,
    context: Annotated[
        str | None, typer.Option(help="grid (neighbours' scores, width fitted) | none.")
    ] = None,
    neighbourhood: Annotated[
        int | None, typer.Option(help="0|1|2: the block of neighbours the model also sees.")
    ] = None,
    drop_neighbours: Annotated[
        float | None, typer.Option(help="Share of training patches shown without neighbours.")
    ] = None,
    split: Annotated[str | None, typer.Option(help="patient|random|PATH to a split file")] = None,
    pretrained: Annotated[bool | None, typer.Option(help="ImageNet weights from the hub.")] = None,
    weights: Annotated[str | None, typer.Option(help="Local pretrained weights file.")] = None,
    fine_tune: Annotated[bool, typer.Option(help="Unfreeze a frozen backbone.")] = False,
    precision: Annotated[str | None, typer.Option(help="auto|bf16|fp32")] = None,
    threshold: Annotated[
        str | None, typer.Option(help="youden|sensitivity, on validation.")
    ] = None,
    target_sensitivity: Annotated[
        float | None, typer.Option(help="For --threshold sensitivity.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN_DIR/last.pt.")] = False,
    threads: Threads = 0,
) -> None:
    """Train a patch classifier; writes best.pt, last.pt, history.csv and config.yaml."""
    from .config import make_config
    from .errors import IdcscopeError
    from .train import train as run_training

    try:
        cfg = make_config(
            recipe,
            config,
            data=str(data_dir),
            out=str(out),
            model=model,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            augment=augment,
            imbalance=imbalance,
            stain=stain,
            keep=keep,
            context=context,
            neighbourhood=neighbourhood,
            drop_neighbours=drop_neighbours,
            split=split,
            pretrained=pretrained,
            weights=weights,
            precision=precision,
            threads=threads or None,
            threshold=threshold,
            target_sensitivity=target_sensitivity,
            model_kwargs={"fine_tune": True} if fine_tune else None,
        )
        _log_to_file(out)
        summary = run_training(cfg, resume=resume)
    except (IdcscopeError, FloatingPointError) as e:
        raise _fail(e) from e
    if not summary:
        return  # a distributed process other than rank 0
    val = summary["val_metrics"]
    logger.info(
        "done: %s/best.pt (epoch %d, val AUC %s, threshold %.3f)",
        out,
        summary["best_epoch"],
        val.get("auc"),
        summary["threshold"],
    )


@app.command()
def evaluate(
    checkpoint: Path,
    data_dir: Path,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, plots and report.html.")],
    split: Annotated[str | None, typer.Option(help="Only this split of the checkpoint's.")] = None,
    tta: Annotated[bool, typer.Option(help="Average the 8 dihedral transforms.")] = False,
    context: Context = True,
    engine: Engine = "auto",
) -> None:
    """Evaluate a checkpoint on held-out patients; writes metrics, plots and an HTML report."""
    from .errors import IdcscopeError
    from .evaluate import evaluate as run_evaluation

    try:
        m = run_evaluation(
            checkpoint, data_dir, out, split=split, tta=tta, context=context, engine=engine
        )
    except IdcscopeError as e:
        raise _fail(e) from e
    _print_headline(m)
    logger.info("report: %s", (out / "report.html").resolve())


@app.command()
def predict(
    checkpoint: Path,
    paths: Annotated[list[Path], typer.Argument(help="Patch files or folders.")],
    out: Annotated[Path, typer.Option(help="CSV: path, patient, x, y, prob_idc, pred, error.")],
    tta: Annotated[bool, typer.Option(help="Average the 8 dihedral transforms.")] = False,
    engine: Engine = "auto",
    context: Context = True,
    batch_size: Annotated[
        int | None, typer.Option(help="Patches per forward pass (default: the engine's best).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding threads (default: cores).")] = None,
) -> None:
    """Predict P(IDC) for patches with nothing but a checkpoint (or an exported .onnx).

    Rows are written as they are scored. Under torchrun the patients are shared out
    between the processes and rank 0 writes the one table.
    """
    from .errors import IdcscopeError
    from .inference.predict import predict as run_prediction

    try:
        df = run_prediction(
            checkpoint, paths, out, batch_size=batch_size, tta=tta, workers=workers,
            engine=engine, context=context,
        )  # fmt: skip
    except IdcscopeError as e:
        raise _fail(e) from e
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("wrote %d rows to %s", len(df), out)


@app.command()
def synth(
    out: Path,
    patients: Annotated[int, typer.Option(help="Number of synthetic patients.")] = 12,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a synthetic H&E-like dataset in the Kaggle layout (a stand-in, not a benchmark)."""
    from .data.synthetic import make_synthetic_dataset

    counts = make_synthetic_dataset(out, n_patients=patients, seed=seed)
    logger.info("%d patches (%d IDC) in %s", counts["n_patches"], counts["n_positive"], out)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the data, the run and the report.")] = Path(
        "runs/demo"
    ),
    epochs: Annotated[int, typer.Option()] = 8,
    threads: Threads = 0,
) -> None:
    """End to end on built-in synthetic data: generate, train, evaluate, report."""
    from .config import make_config
    from .data.synthetic import make_synthetic_dataset
    from .evaluate import evaluate as run_evaluation
    from .train import train as run_training

    data = out / "data"
    if not data.exists():
        make_synthetic_dataset(data, n_patients=12, seed=0)
    cfg = make_config(
        "default",
        data=str(data),
        out=str(out / "run"),
        epochs=epochs,
        threads=threads or None,
        cache_dir=str(out / "cache"),
    )
    _log_to_file(out / "run")
    run_training(cfg)
    m = run_evaluation(out / "run" / "best.pt", data, out / "eval", split="test")
    _print_headline(m)
    print(f"\nReport: {(out / 'eval' / 'report.html').resolve()}")


@app.command()
def download() -> None:
    """Download the Kaggle IDC dataset with kagglehub (needs network and Kaggle credentials)."""
    from .data.download import download_kaggle
    from .errors import IdcscopeError

    try:
        print(download_kaggle())
    except IdcscopeError as e:
        raise _fail(e) from e


@app.command()
def models(timm: Annotated[bool, typer.Option(help="Also list timm's zoo.")] = False) -> None:
    """List the model names ``--model`` accepts."""
    from .models import list_models

    print("\n".join(list_models(include_timm=timm)))


@app.command()
def export(
    checkpoint: Path,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the only format).")] = False,
    out: Annotated[Path | None, typer.Option(help="Default: CHECKPOINT with .onnx.")] = None,
) -> None:
    """Export a checkpoint, normalisation and metadata included, for ONNX Runtime."""
    from .errors import IdcscopeError
    from .inference.onnx import export_onnx

    if not onnx:
        raise _fail(IdcscopeError("choose an export format: --onnx"))
    try:
        path = export_onnx(checkpoint, out)
    except IdcscopeError as e:
        raise _fail(e) from e
    logger.info("wrote %s", path)


@app.command()
def cv(
    data_dir: Path,
    out: Annotated[Path, typer.Option(help="Folder for the folds, cv.json and cv.md.")],
    folds: Annotated[int, typer.Option(help="Number of patient folds.")] = 5,
    recipe: Recipe = "default",
    config: Annotated[Path | None, typer.Option(help="YAML file of config values.")] = None,
    model: Annotated[str | None, typer.Option()] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    tta: Annotated[bool, typer.Option(help="Average the 8 dihedral transforms.")] = False,
    threads: Threads = 0,
) -> None:
    """Patient-level cross-validation: per-fold and pooled metrics with bootstrap 95% CIs."""
    from .config import make_config
    from .cv import cross_validate
    from .errors import IdcscopeError

    try:
        cfg = make_config(
            recipe,
            config,
            data=str(data_dir),
            out=str(out),
            model=model,
            epochs=epochs,
            seed=seed,
            threads=threads or None,
        )
        _log_to_file(out)
        result = cross_validate(cfg, folds=folds, tta=tta)
    except IdcscopeError as e:
        raise _fail(e) from e
    print((out / "cv.md").read_text())
    pooled = result["pooled"]
    logger.info("pooled over %d patients: AUC %.4f", pooled["n_patients"], pooled["auc"])


@app.command()
def ensemble(
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoints.")],
    data: Annotated[Path, typer.Option(help="Dataset folder of patients to test on.")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, plots and report.html.")],
    split: Annotated[str | None, typer.Option(help="Only this split of the first model's.")] = None,
    tta: Annotated[bool, typer.Option(help="Average the 8 dihedral transforms.")] = False,
    context: Context = True,
    engine: Engine = "auto",
) -> None:
    """Evaluate an ensemble: the mean of the members' calibrated probabilities."""
    from .errors import IdcscopeError
    from .evaluate import evaluate as run_evaluation

    try:
        m = run_evaluation(
            list(checkpoints), data, out, split=split, tta=tta, context=context, engine=engine
        )
    except IdcscopeError as e:
        raise _fail(e) from e
    _print_headline(m)
    logger.info("report: %s", (out / "report.html").resolve())


def _print_headline(m: dict) -> None:
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


def _log_to_file(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


# The commands that show results to a person (explain, heatmap, slide, serve) live in
# their own module; importing it registers them on ``app``.
from . import _cli_views  # noqa: E402, F401

if __name__ == "__main__":
    app()
