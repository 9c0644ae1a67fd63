"""Choosing a recipe above the noise: repeated cross-validation runs compared paired by patient.

One cross-validation run of a recipe is one draw: its training seed alone moves pooled AUC
on whole patients by up to 0.06 (benchmarks/RECIPES.md), more than most gaps between
recipes. So a recipe is a set of runs
(``idcscope cv`` folders: several training seeds, and fold draws with ``--fold-seed``), all
testing the same patients with the same patients locked away. Each run's out-of-fold
predictions are calibrated, thresholded and called as the shipped model would be
(``contexts.cross_fitted``), then every metric is computed per cohort (scoring mode x data
folder, as ``contexts.cohorts`` names them) and the recipes are compared by the difference
of their mean over runs.

The difference has two sources of noise, both reported:

- the patients: a paired bootstrap draws patients with replacement, the same draw for
  every run of both recipes, and recomputes the difference;
- the training: when both recipes ran the same training seeds on the same folds, runs are
  paired by seed (a seed's luck, its initialisation and its order of batches, is largely
  shared between recipes) and the spread of the per-seed differences enters as
  ``sd^2 / n``; otherwise the spread of one metric between runs of one recipe (pooled over
  the recipes that have several runs) enters as ``sd^2 (1/n_a + 1/n_b)``.

The interval is t-based, its degrees of freedom those of the training's share of the noise
(Welch-Satterthwaite): a few seeds are not a large sample. A candidate is "better" only
when the 95% interval of its gain over the baseline lies above zero (below for ECE),
"worse" when it lies below, and "within noise" otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import IdcscopeError
from ..evaluation import metrics
from . import contexts
from .config import config_from_dict
from .contexts import ALPHA

# name -> +1 when higher is better, -1 when lower is
METRICS = {"auc": 1, "balanced_accuracy": 1, "f1": 1, "ece": -1, "decided": 1}
Z95 = 1.959964


def load_run(run: str | Path, alpha: float = ALPHA) -> pd.DataFrame:
    """A cv run's out-of-fold predictions of every scoring mode, decided as a model of
    the run's recipe would decide them, with a ``cohort`` column (``mode/folder``) and
    ``attrs["seeds"]``: (fold seed, training seed), what :func:`compare` pairs runs by."""
    pooled, rule, seeds = read_oof(run)
    decided = decide_oof(pooled, rule, alpha)
    decided.attrs["seeds"] = seeds
    return decided


def load_ensemble(runs: list[str | Path], alpha: float = ALPHA) -> pd.DataFrame:
    """Runs on the same folds (other training seeds, ``--fold-seed`` shared) as one
    recipe: the mean logit margin of their fold models on the rows every run scored (the
    thinned rows differ by seed and drop out), decided as :func:`load_run` decides. What
    an ensemble of them gives, and so what distilling them into one network can reach."""
    read = [read_oof(run) for run in runs]
    keys = ["path", "scored"]
    frames = [frame.set_index(keys) for frame, *_ in read]
    common = frames[0].index
    for frame in frames[1:]:
        common = common.intersection(frame.index)
    if not len(common):
        raise IdcscopeError(f"{', '.join(map(str, runs))}: no patch scored by every run")
    margin = np.mean([f.loc[common, "margin"].to_numpy() for f in frames], axis=0)
    pooled = frames[0].loc[common].assign(margin=margin).reset_index()
    return decide_oof(pooled, read[0][1], alpha)


def read_oof(run: str | Path) -> tuple[pd.DataFrame, tuple, tuple]:
    """A cv folder's out-of-fold predictions (``margin``, ``neighbours``, ``fold``, ...),
    its threshold rule and its (fold seed, training seed)."""
    run = Path(run)
    try:
        result = json.loads((run / "cv.json").read_text())
        cfg = config_from_dict(result["config"])
        pooled = pd.read_csv(run / "oof_predictions.csv", dtype={"patient": str})
    except (OSError, ValueError, KeyError) as e:
        raise IdcscopeError(f"{run}: not a finished `idcscope cv` folder ({e!r})") from e
    return pooled, cfg.threshold_rule, (result.get("fold_seed", cfg.seed), cfg.seed)


def decide_oof(pooled: pd.DataFrame, rule: tuple, alpha: float) -> pd.DataFrame:
    """``pooled`` calibrated, thresholded and called cross-fitted over its folds, with the
    ``cohort`` of each row (scoring mode / data folder)."""
    decided = contexts.cross_fitted(pooled, rule, alpha)
    folder = decided["path"].str.split("/").str[0]
    return decided.assign(cohort=decided["scored"] + "/" + folder)


def cohort_values(frame: pd.DataFrame) -> dict[str, float]:
    """Every metric of :data:`METRICS` on decided predictions (``label``, ``prob_idc``,
    ``pred``, ``call``)."""
    return _values(*_arrays(frame))


def _arrays(frame: pd.DataFrame) -> tuple[np.ndarray, ...]:
    return tuple(frame[c].to_numpy(np.float64) for c in ("label", "prob_idc", "pred", "call"))


def _values(y, prob, pred, call) -> dict[str, float]:
    at = metrics.binary_metrics(y, pred, 0.5)
    auc = metrics.rank_auc(y, prob)
    return {
        "auc": np.nan if auc is None else auc,
        "balanced_accuracy": at["balanced_accuracy"],
        "f1": at["f1"],
        "ece": metrics.expected_calibration_error(y, prob),
        "decided": float(np.mean(call >= 0)),
    }


class _Draws:
    """One run's rows of one cohort grouped by patient, for patient bootstrap draws."""

    def __init__(self, frame: pd.DataFrame, patients: np.ndarray):
        frame = frame[frame["patient"].isin(patients)]
        order = np.argsort(frame["patient"].to_numpy(), kind="stable")
        self.arrays = [a[order] for a in _arrays(frame)]
        sorted_patients = frame["patient"].to_numpy()[order]
        first = np.searchsorted(sorted_patients, patients, side="left")
        self.starts = first
        self.lengths = np.searchsorted(sorted_patients, patients, side="right") - first

    def values(self, draw: np.ndarray) -> dict[str, float]:
        lengths = self.lengths[draw]
        offsets = np.repeat(self.starts[draw] - np.cumsum(lengths) + lengths, lengths)
        rows = offsets + np.arange(lengths.sum())
        return _values(*(a[rows] for a in self.arrays))


def compare(
    baseline: list[pd.DataFrame],
    candidate: list[pd.DataFrame],
    noise: list[list[pd.DataFrame]] = (),
    n_boot: int = 300,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired, patient-level comparison of two recipes, each given as runs (frames of
    :func:`load_run`, or any frames with ``patient``, ``label``, ``prob_idc``, ``pred``,
    ``call`` and ``cohort``).

    Runs are paired by training seed when both recipes are the same seeds on the same
    folds (``attrs["seeds"]``, as :func:`load_run` sets it); otherwise ``noise`` adds the
    runs of other recipes to the estimate of the spread between runs of one recipe (the
    baseline's and the candidate's own runs always count). Returns one row per cohort and
    metric: the two recipes' means over runs, the difference (candidate - baseline) with
    its standard errors from the patients and from the training, its 95% interval and the
    verdict.
    """
    if not baseline or not candidate:
        raise IdcscopeError("compare needs at least one run of each recipe")
    order = _seed_pairs(baseline, candidate)
    if order is not None:
        candidate, noise = [candidate[i] for i in order], ()
    recipes = [list(baseline), list(candidate), *map(list, noise)]
    _check_same_patients([run for runs in recipes for run in runs])
    rng = np.random.default_rng(seed)
    rows = []
    for cohort in sorted(set.intersection(*(set(r["cohort"]) for r in baseline + candidate))):
        parts = [[run[run["cohort"] == cohort] for run in runs] for runs in recipes]
        patients = np.array(
            sorted(set.intersection(*(set(p["patient"]) for p in parts[0] + parts[1])))
        )
        full = [[cohort_values(p) for p in runs] for runs in parts]
        draws = [[_Draws(p, patients) for p in runs] for runs in parts[:2]]
        boot = []
        for _ in range(n_boot):
            draw = rng.integers(0, len(patients), len(patients))
            means = [_mean([d.values(draw) for d in runs]) for runs in draws]
            boot.append({m: means[1][m] - means[0][m] for m in METRICS})
        for name, sign in METRICS.items():
            boot_name = [b[name] for b in boot]
            rows.append(_row(cohort, name, sign, full, boot_name, len(patients), order is not None))
    return pd.DataFrame(rows)


def _seed_pairs(baseline: list[pd.DataFrame], candidate: list[pd.DataFrame]) -> list | None:
    """The candidate's runs in the order of the baseline's when both recipes ran the same
    (fold seed, training seed) pairs, at least two; None when they cannot be paired."""
    ours, theirs = ([run.attrs.get("seeds") for run in runs] for runs in (baseline, candidate))
    if len(ours) < 2 or None in ours or len(set(ours)) < len(ours):
        return None
    if len(theirs) != len(ours) or set(theirs) != set(ours):
        return None
    return [theirs.index(key) for key in ours]


def _row(
    cohort: str, name: str, sign: int, full: list, boot: list, n_patients: int, paired: bool
) -> dict:
    values = [np.array([v[name] for v in runs]) for runs in full]
    base, cand = values[0].mean(), values[1].mean()
    if paired:
        diff = values[1] - values[0]
        diff = diff[np.isfinite(diff)]  # a cohort a run lacks counts for nothing
        sd_seed, df = (float(diff.std(ddof=1)), len(diff) - 1) if len(diff) > 1 else (0.0, 0)
        se_training = sd_seed / np.sqrt(max(len(diff), 1))
    else:
        finite = [v[np.isfinite(v)] for v in values]
        sd_seed, df = _pooled_sd([v for v in finite if len(v) >= 2])
        se_training = sd_seed * np.sqrt(1 / len(values[0]) + 1 / len(values[1]))
    se_patients = float(np.nanstd(boot, ddof=1))
    se = float(np.hypot(se_patients, se_training))
    delta = cand - base
    half = _t95(se, se_training, df) * se
    low, high = delta - half, delta + half
    gain_low, gain_high = sorted((sign * low, sign * high))
    verdict = "better" if gain_low > 0 else "worse" if gain_high < 0 else "within noise"
    runs = f"{len(values[0])} vs {len(values[1])}" + (", paired" if paired else "")
    return {
        "cohort": cohort, "metric": name, "patients": n_patients, "runs": runs,
        "baseline": base, "candidate": cand, "delta": delta, "se_patients": se_patients,
        "sd_seed": sd_seed, "se_training": se_training, "seed_df": df,
        "ci_low": low, "ci_high": high, "verdict": verdict,
    }  # fmt: skip


def _t95(se: float, se_training: float, df: int) -> float:
    """The 97.5% t quantile for a standard error whose training share has ``df`` degrees of
    freedom and whose patients' share has many (Welch-Satterthwaite)."""
    if not df or not se_training or not np.isfinite(se):
        return Z95
    return float(stats.t.ppf(0.975, df * (se / se_training) ** 4))


def _pooled_sd(groups: list[np.ndarray]) -> tuple[float, int]:
    """The spread of a metric between runs of one recipe, pooled over recipes: (sd, df);
    (0, 0) when no recipe has two runs (then only the patients' noise is counted)."""
    df = sum(len(g) - 1 for g in groups)
    if not df:
        return 0.0, 0
    return float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / df)), df


def _mean(values: list[dict]) -> dict:
    return {m: float(np.mean([v[m] for v in values])) for m in METRICS}


def _check_same_patients(runs: list[pd.DataFrame]) -> None:
    """Runs compared paired must have tested the same patients (the same locked ones
    left out)."""
    first = set(runs[0]["patient"])
    for i, run in enumerate(runs[1:], 1):
        if set(run["patient"]) != first:
            extra, missing = set(run["patient"]) - first, first - set(run["patient"])
            raise IdcscopeError(
                f"run {i} tested other patients than run 0 (+{sorted(extra)[:5]}, "
                f"-{sorted(missing)[:5]}): compare runs of the same data and locked patients"
            )


def seed_spread(runs: list[str | Path], alpha: float = ALPHA) -> dict:
    """How far the training seed moves what a model of a recipe gives: ``runs`` (cv
    folders) of one recipe under different seeds on the same patients, each decided as
    :func:`load_run` decides, and per cohort the lowest and highest of each metric of
    :data:`METRICS` over them (None where no run has it), with the runs' (fold seed,
    training seed). What a card says of the one network it describes."""
    frames = [load_run(run, alpha) for run in runs]
    seeds = [list(frame.attrs["seeds"]) for frame in frames]
    if len({tuple(s) for s in seeds}) < len(seeds):
        raise IdcscopeError(
            f"{', '.join(map(str, runs))}: runs of the same (fold seed, seed) {seeds} "
            "are one draw, not a spread"
        )
    _check_same_patients(frames)
    spread = {}
    for cohort in sorted(set.intersection(*(set(f["cohort"]) for f in frames))):
        values = [cohort_values(f[f["cohort"] == cohort]) for f in frames]
        spread[cohort] = {m: _range([v[m] for v in values]) for m in METRICS}
    return {"seeds": seeds, "cohorts": spread}


def _range(values: list[float]) -> list | None:
    finite = [v for v in values if np.isfinite(v)]
    return [float(min(finite)), float(max(finite))] if finite else None


def per_patient(
    baseline: list[pd.DataFrame], candidate: list[pd.DataFrame], cohort: str
) -> pd.DataFrame:
    """AUC within each patient of ``cohort`` (patients with both classes), each recipe's
    mean over its runs, and the difference: where a recipe's gain comes from."""

    def auc(runs: list[pd.DataFrame]) -> pd.Series:
        per_run = [
            run[run["cohort"] == cohort]
            .groupby("patient")[["label", "prob_idc"]]
            .apply(lambda p: metrics.rank_auc(p["label"], p["prob_idc"]))
            for run in runs
        ]
        return pd.concat(per_run, axis=1).astype(float).mean(axis=1)

    first = baseline[0][baseline[0]["cohort"] == cohort].groupby("patient")["label"]
    table = pd.DataFrame({
        "patches": first.size(), "idc_share": first.mean(),
        "baseline": auc(baseline), "candidate": auc(candidate),
    }).dropna()  # fmt: skip
    return table.assign(delta=table["candidate"] - table["baseline"]).sort_values("delta")


def markdown(table: pd.DataFrame, names: tuple[str, str] = ("baseline", "candidate")) -> str:
    """The comparison as a markdown table, one row per cohort and metric."""
    head = (
        f"| cohort | metric | patients | runs | {names[0]} | {names[1]} | difference [95%] "
        "| from patients | from training (df) | verdict |"
    )
    lines = [head, "|---" * 10 + "|"]
    for r in table.itertuples():
        lines.append(
            f"| {r.cohort} | {r.metric} | {r.patients} | {r.runs} | {r.baseline:.3f} "
            f"| {r.candidate:.3f} | {r.delta:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] "
            f"| {r.se_patients:.3f} | {r.se_training:.3f} ({r.seed_df}) | {r.verdict} |"
        )
    return "\n".join(lines)
