"""``idcscope evaluate``, ``predict``, ``ensemble``, ``export`` and ``models``: scoring with a model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .app import (
    EXIT_CODES_HELP,
    CallAlpha,
    Context,
    DataDirs,
    Engine,
    Inputs,
    Model,
    ReportDir,
    Tta,
    app,
    data_arg,
    fail,
    logger,
    model_path,
    out_file,
    out_folder,
    print_headline,
    scored_exit,
)


@app.command(epilog=EXIT_CODES_HELP)
def evaluate(
    data_dir: DataDirs,
    out: ReportDir,
    split: Annotated[str | None, typer.Option(help="Only this split of the checkpoint's.")] = None,
    tta: Tta = False,
    context: Context = True,
    engine: Engine = "auto",
    alpha: CallAlpha = None,
    model: Model = None,
) -> None:
    """Evaluate a model on held-out patients; writes metrics, plots and an HTML report."""
    options = {"split": split, "tta": tta, "context": context, "engine": engine, "alpha": alpha}
    report(model_path(model), data_arg(data_dir), out, **options)


@app.command(epilog=EXIT_CODES_HELP)
def predict(
    paths: Inputs,
    out: Annotated[
        Path,
        typer.Option(help="CSV: path, patient, x, y, prob_idc, pred, error (folder made)."),
    ],
    tta: Tta = False,
    engine: Engine = "auto",
    context: Context = True,
    batch_size: Annotated[
        int | None, typer.Option(help="Patches per forward pass (default: the engine's best).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding threads (default: cores).")] = None,
    alpha: CallAlpha = None,
    model: Model = None,
) -> None:
    """Predict P(IDC) for patches (files or folders) with a model: the bundled one, a
    checkpoint, an exported .onnx or a model folder.

    Rows are written as they are scored, whole rows a bucket at a time: a run that stops
    (killed, disk full) leaves every row it wrote readable. Under torchrun the patients are
    shared out between the processes and rank 0 writes the one table.
    """
    out_file(out)  # before the imports: a wrong --out fails at once
    from ..inference.predict import predict as run_prediction

    df = run_prediction(
        model_path(model), paths, out, batch_size=batch_size, tta=tta, workers=workers,
        engine=engine, context=context, alpha=alpha,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("wrote %d rows to %s", len(df), out)
        n_bad = int((df["error"].fillna("") != "").sum())
        scored_exit(len(df) - n_bad, n_bad, f"the error column of {out}")


@app.command(epilog=EXIT_CODES_HELP)
def ensemble(
    data_dir: DataDirs,
    out: ReportDir,
    split: Annotated[str | None, typer.Option(help="Only this split of the first model's.")] = None,
    tta: Tta = False,
    context: Context = True,
    engine: Engine = "auto",
    alpha: CallAlpha = None,
    model: Annotated[
        list[str], typer.Option(help="Two or more models (as --model of evaluate).")
    ] = (),
) -> None:
    """Evaluate an ensemble: the mean of the members' calibrated probabilities."""
    if len(model) < 2:
        raise typer.BadParameter("an ensemble needs two or more", param_hint="--model")
    options = {"split": split, "tta": tta, "context": context, "engine": engine, "alpha": alpha}
    report([model_path(m) for m in model], data_arg(data_dir), out, **options)


def report(checkpoints, data: Path, out: Path, **options) -> None:
    """``evaluate`` on ``data``, its headline metrics printed and its report named; exits
    3 when some files could not be read."""
    out_folder(out)
    from ..evaluation.evaluate import evaluate as run_evaluation

    m = run_evaluation(checkpoints, data, out, **options)
    print_headline(m)
    logger.info("report: %s", (out / "report.html").resolve())
    summary = m["data_summary"]
    n_skipped = summary["n_skipped"]
    scored_exit(summary["n_files"] - n_skipped, n_skipped, out / "skipped.csv")


@app.command()
def export(
    checkpoint: Path,
    onnx: Annotated[bool, typer.Option("--onnx", help="An ONNX graph for ONNX Runtime.")] = False,
    bundle: Annotated[
        bool, typer.Option("--bundle", help="A model folder: config.json, model.safetensors.")
    ] = False,
    card: Annotated[Path | None, typer.Option(help="Model card (markdown) for --bundle.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Default: CHECKPOINT with .onnx; a folder for --bundle.")
    ] = None,
) -> None:
    """Export a checkpoint: an ONNX graph (normalisation and metadata included), or a model
    folder in the Hugging Face layout that every command takes as a checkpoint."""
    from ..errors import IdcscopeError
    from ..inference.export import export_onnx, save_bundle

    try:
        if onnx == bundle:
            raise IdcscopeError("choose one export format: --onnx or --bundle")
        if bundle and out is None:
            raise IdcscopeError("--bundle needs --out FOLDER")
        text = card.read_text() if card else None
        path = export_onnx(checkpoint, out) if onnx else save_bundle(checkpoint, out, text)
    except (IdcscopeError, OSError) as e:
        raise fail(e) from e
    logger.info("wrote %s", path)


@app.command()
def models(timm: Annotated[bool, typer.Option(help="Also list timm's zoo.")] = False) -> None:
    """The trained models that ship with idcscope (``--model`` of the commands that score),
    with what their cards say of unseen patients; then the architectures ``train --model``
    builds."""
    from ..models import list_models
    from ..models.bundle import bundled_models, card_summary

    shipped = bundled_models()
    print("Trained models (--model of predict, evaluate, explain, heatmap, slide, serve):")
    for name, folder in shipped.items():
        print(f"  {name}  ({folder})\n" + "\n".join(f"    {line}" for line in card_summary(folder)))
    if not shipped:
        print("  none bundled in this installation")
    print("Architectures (--model of train):")
    print("\n".join(f"  {n}" for n in list_models(include_timm=timm)))
