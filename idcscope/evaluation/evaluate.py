"""Evaluate a checkpoint on patients: metrics, per-patient view, plots and an HTML report.

The decision threshold is the one stored in the checkpoint, chosen on the validation
patients at training time; the test data never chooses anything. Patients that the
checkpoint trained or validated on are named in a warning.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from ..data import splits as splitting
from ..data.manifest import index_datasets, roots_text, summarize, write_skipped
from ..errors import IdcscopeError, NothingScoredError
from ..inference.predictor import Predictor
from ..inference.stream import young_garbage_only
from ..inference.tables import PATCH_IDS, Verdicts, prediction_table
from . import metrics, plots
from .report import write_html_report

logger = logging.getLogger(__name__)


def evaluate(
    checkpoint: str | Path | list,
    data_dir: str | Path,
    out_dir: str | Path,
    split: str | None = None,
    tta: bool = False,
    batch_size: int | None = None,
    n_boot: int = 500,
    context: bool = True,
    engine: str = "auto",
    alpha: float | None = None,
) -> dict:
    """Evaluate a checkpoint (or an ensemble of them) on ``data_dir``.

    Every patch is test data unless ``split`` names one split of the (first) checkpoint's.
    ``context=False`` scores every patch alone, as if it came without coordinates: no
    neighbourhood input, no smoothing (see ``data.grid`` and ``data.neighbourhood``).
    ``alpha``: the uncertain band the calls are made with (``Predictor``; None: the model's).
    Patches are decoded as they are scored (``inference.stream``): nothing is cached.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(
        checkpoint, engine, tta=tta, batch_size=batch_size, context=context, alpha=alpha
    )
    meta = predictor.models[0]
    with young_garbage_only():  # indexing makes objects by the hundred thousand
        index = index_datasets(data_dir, read_sizes=False)
    ckpt_splits = meta.splits
    warnings = _warnings(predictor, index.table, split)
    chosen = np.ones(len(index.table), bool)
    if split:
        chosen = splitting.assign(index.table, ckpt_splits) == split
    table = index.table[chosen].reset_index(drop=True)
    if table.empty:
        raise IdcscopeError(f"{roots_text(data_dir)}: no patches to evaluate (split={split!r})")
    scored = predictor.score_files(table, index.root, desc="evaluate")
    skipped = index.skipped + [
        (p, r) for p, r in zip(table["path"], scored.reasons, strict=True) if r
    ]
    write_skipped(out / "skipped.csv", skipped)  # with predictions.csv: every file
    ok = scored.ok
    if not ok.any():
        raise NothingScoredError(
            f"{roots_text(data_dir)}: none of the {len(table) + len(index.skipped)} files could be read; "
            f"the reasons are in {out / 'skipped.csv'}"
        )
    table, raw, verdicts = (
        table[ok].reset_index(drop=True),
        scored.raw[ok],
        scored.verdicts.take(ok),
    )
    result = _metrics(table, verdicts.prob, raw, predictor.threshold, n_boot)
    result["calls"] = _call_metrics(table, verdicts.call, n_boot)
    result["input_check"] = verdicts.counts()["input_check"]
    summary = summarize(table) | {
        "n_files": len(table) + len(skipped),
        "n_skipped": len(skipped),
        "n_padded": scored.n_padded,
        "layout": index.layout,
    }
    result.update(
        checkpoint=", ".join(map(str, predictor.paths)),
        n_models=len(predictor.members),
        engine=predictor.engine,
        data=roots_text(data_dir),
        split=split or "all",
        split_method=ckpt_splits.get("method", "patient"),
        tta=tta,
        context_sigma=predictor.context_sigma,
        threshold_source=meta.threshold_method,
        leaks_patients=ckpt_splits.get("method") == "random",
        data_summary=summary,
        warnings=warnings,
    )
    _write_outputs(out, result, table, verdicts, checkpoint)
    for w in warnings:
        logger.warning(w)
    return result


def _warnings(predictor: Predictor, table, split: str | None) -> list[str]:
    warnings: list[str] = []
    if split and len(predictor.members) > 1:
        warnings.append(
            f"split {split!r} is the first member's; other members may have trained on "
            "these patients"
        )
    if not split:
        overlap = sorted(predictor.seen_patients & set(table["patient"]))
        if overlap:
            warnings.append(
                f"{len(overlap)} of these patients were used to train or validate "
                f"this model: {', '.join(overlap[:10])}; the numbers are optimistic"
            )
    if any(m.splits.get("method") == "random" for m in predictor.models):
        warnings.append("This model was trained on an " + splitting.LEAK_WARNING + ".")
    return warnings


def _describe(result: dict) -> str:
    ci = "".join(
        f"\n  {k}: {lo:.3f} to {hi:.3f}" for k, (lo, hi) in result["ci95"].items() if lo is not None
    )
    return (
        f"checkpoint: {result['checkpoint']}\ndata: {result['data']}\n"
        f"patients: {result['n_patients']} (split: {result['split']}, "
        f"{result['split_method']}-level split)\n"
        f"threshold: {result['threshold']:.4f} ({result['threshold_source']})\n"
        f"test-time augmentation: {result['tta']}\n"
        f"spatial context (Gaussian sigma, grid cells): {result['context_sigma']}\n"
        f"calls: {_calls_line(result['calls'])}\n"
        f"patient-clustered bootstrap 95% CI:{ci or ' needs 3+ patients'}"
    )


def _calls_line(calls: dict) -> str:
    """The three-way calls in one line: the share decided and how right they are."""

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    return (
        f"{calls['coverage']:.1%} decided ({calls['n_uncertain']} uncertain); among the "
        f"decided sensitivity {f(calls['sensitivity_decided'])}, specificity "
        f"{f(calls['specificity_decided'])}"
    )


def _metrics(table, prob, raw, threshold: float, n_boot: int) -> dict:
    """How calibrated P(IDC) ``prob`` (and uncalibrated ``raw``) of ``table``'s patches
    meet their labels: at the threshold and at 0.5, per patient, with patient-clustered
    bootstrap CIs and calibration errors."""
    y, patients = table["label"].to_numpy(), table["patient"].to_numpy()
    result = metrics.binary_metrics(y, prob, threshold)
    result["per_patient"] = metrics.per_patient_metrics(y, prob, patients, threshold)
    result["n_patients"] = len(set(patients))
    result["at_threshold_0.5"] = metrics.binary_metrics(y, prob, 0.5)
    result["ci95"] = _confidence_intervals(y, prob, patients, threshold, n_boot)
    result["ece"] = metrics.expected_calibration_error(y, prob)
    result["ece_uncalibrated"] = metrics.expected_calibration_error(y, raw)
    return result


def _call_metrics(table, call: np.ndarray, n_boot: int) -> dict:
    """The three-way calls (``metrics.call_metrics``), pooled with patient-clustered 95%
    CIs, and per patient."""
    y, patients = table["label"].to_numpy(), table["patient"].to_numpy()
    result = metrics.call_metrics(y, call)
    if n_boot > 0 and len(set(patients)) >= 3:
        result["ci95"] = metrics.call_cis(y, call, patients, n_boot)
    result["per_patient"] = [
        {"patient": str(p), **metrics.call_metrics(y[patients == p], call[patients == p])}
        for p in np.unique(patients)
    ]
    return result


def _confidence_intervals(y, prob, patients, threshold, n_boot) -> dict:
    """Patient-clustered bootstrap: resampling patients, not patches, is what new patients vary."""
    if n_boot <= 0 or len(set(patients)) < 3:
        return {}

    def at(key):
        return lambda yy, pp: metrics.binary_metrics(yy, pp, threshold)[key]

    fns = {key: at(key) for key in ("auc", "balanced_accuracy", "f1")}
    fns["ece"] = metrics.expected_calibration_error
    return {
        key: list(metrics.bootstrap_ci(y, prob, patients, fn, n_boot=n_boot))
        for key, fn in fns.items()
    }


def _write_outputs(out: Path, result: dict, table, verdicts: Verdicts, checkpoint) -> None:
    """The metrics, report, figures and ``predictions.csv``: a row per patch with its label
    and what the model says of it (``inference.tables``)."""
    y, prob = table["label"].to_numpy(), verdicts.prob
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    report_text = metrics.classification_report_text(y, prob >= result["threshold"])
    (out / "classification_report.txt").write_text(report_text)
    predictions = prediction_table(table[PATCH_IDS], verdicts, result["threshold"], label=y)
    predictions.to_csv(out / "predictions.csv", index=False)
    figures = {
        "ROC curve": plots.plot_roc(y, prob, threshold=result["threshold"]),
        "Precision-recall curve": plots.plot_pr(y, prob, threshold=result["threshold"]),
        "Confusion matrix": plots.plot_confusion_matrix(result["confusion_matrix"]),
        "Per-patient AUC": plots.plot_per_patient(result["per_patient"]),
        "Reliability": plots.plot_reliability(y, prob),
    }
    first = checkpoint[0] if isinstance(checkpoint, list) else checkpoint
    history = Path(first).parent / "history.csv"
    if history.exists():
        with history.open() as f:
            figures["Training curves"] = plots.plot_history(list(csv.DictReader(f)))
    names = {
        "ROC curve": "roc.png",
        "Precision-recall curve": "pr.png",
        "Confusion matrix": "confusion_matrix.png",
        "Per-patient AUC": "per_patient.png",
        "Reliability": "reliability.png",
        "Training curves": "training_curves.png",
    }
    for caption, fig in figures.items():
        plots.save_figure(fig, out / names[caption])
    saved = {caption: names[caption] for caption in figures}  # relative to the report
    write_html_report(
        out,
        title="idcscope evaluation",
        metrics=result,
        figures=saved,
        sections={
            "Evaluation": _describe(result),
            "Classification report": report_text,
            "Data": json.dumps(result["data_summary"], indent=2),
        },
        warnings=result["warnings"],
    )
