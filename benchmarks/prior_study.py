"""Prior study: does adapting each upload to its patient's own share of IDC pay?

    python benchmarks/prior_study.py runs/cv/default-s0 runs/cv/default-s1 runs/cv/default-s2

Patients differ in how much carcinoma they hold (0% to 62% of patches here), and a
calibration fitted on all of them aims at their pooled share. When a user's upload is one
patient (a whole patient, or a few of its patches), its own share can be estimated from its
scores without labels: the EM of Saerens, Latinne & Decaestecker (Neural Comput. 2002) for
a shift of class priors, each patch's calibrated P(IDC) moved by the logit of the estimated
share over the pooled one, to a fixed point. With ``strength`` pseudo-patches of a Beta prior
at the pooled share, small uploads move less.

Cross-fitted over each run's folds (``oof_predictions.csv``): the other folds' patients fit
calibration and bands per context (``contexts.fit_decisions``); every row's probability under
that fit is adapted per patient and scoring mode (not lone patches: one patch has no upload
to learn from); the other folds' adapted rows fit calibration and bands again, applied to
the held-out fold. ``--strength inf`` moves nothing: the control, the same two fits with no
shift between them. Printed per run, scoring mode and data folder: AUC, ECE, the share
decided and sensitivity and specificity among the decided, control -> adapted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit, logit

from idcscope.evaluation import metrics
from idcscope.training import contexts

RULE = ("youden", None)
KEYS = ("auc", "ece", "coverage", "sensitivity_decided", "specificity_decided")


def upload_prior(prob: np.ndarray, pooled: float, strength: float) -> float:
    """The MAP share of IDC of one upload: EM over prior shift, Beta prior of ``strength``
    pseudo-patches at the ``pooled`` share."""
    z, share = logit(np.clip(prob, 1e-6, 1 - 1e-6)), pooled
    for _ in range(200):
        moved = expit(z + logit(share) - logit(pooled))
        new = (moved.sum() + strength * pooled) / (len(z) + strength)
        if abs(new - share) < 1e-8:
            break
        share = new
    return share


def adapted(decided: pd.DataFrame, strength: float) -> pd.DataFrame:
    """Calibrated margins moved per (scoring mode, patient) by the upload's prior shift,
    as the next fit's ``margin``."""
    z = logit(np.clip(decided["prob_idc"].to_numpy(np.float64), 1e-6, 1 - 1e-6))
    shift = np.zeros(len(z))
    for (mode, _), rows in decided.groupby(["scored", "patient"]).indices.items():
        if mode != "lone" and np.isfinite(strength):
            pooled = decided.loc[decided["scored"] == mode, "prob_idc"].mean()
            share = upload_prior(decided["prob_idc"].to_numpy()[rows], pooled, strength)
            shift[rows] = logit(share) - logit(pooled)
    return decided.drop(columns=["prob_idc", "pred", "call"]).assign(margin=z + shift)


def cross_fitted(pooled: pd.DataFrame, strength: float) -> pd.DataFrame:
    """Each fold's rows called by a fit on the other folds' adapted probabilities."""
    parts = []
    for fold in sorted(pooled["fold"].unique()):
        mine = pooled["fold"] == fold
        first = contexts.fit_decisions(pooled[~mine], RULE)
        moved = adapted(contexts.decide(first["contexts"], pooled, 0.5), strength)
        second = contexts.fit_decisions(moved[~mine], RULE)
        parts.append(contexts.decide(second["contexts"], moved[mine], second["threshold"]))
    return pd.concat(parts).loc[pooled.index]


def measure(decided: pd.DataFrame) -> pd.DataFrame:
    folder = decided["path"].str.split("/").str[0]
    rows = []
    for (mode, name), f in decided.groupby([decided["scored"], folder]):
        y, prob = f["label"].to_numpy(), f["prob_idc"].to_numpy()
        m = metrics.call_metrics(y, f["call"].to_numpy())
        rows.append({
            "scored": mode, "folder": name, "auc": metrics.rank_auc(y, prob),
            "ece": metrics.expected_calibration_error(y, prob), **{k: m[k] for k in KEYS[2:]},
        })  # fmt: skip
    return pd.DataFrame(rows).set_index(["scored", "folder"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="idcscope cv folders")
    parser.add_argument("--strength", type=float, nargs="+", default=[20.0, 200.0, 2000.0])
    args = parser.parse_args()
    head = "| run | strength | scored | folder | AUC | ECE | decided | sens. | spec. |"
    print(head + "\n" + "|---" * 9 + "|")
    for run in args.runs:
        pooled = pd.read_csv(run / "oof_predictions.csv", dtype={"patient": str})
        before = measure(cross_fitted(pooled, np.inf))
        for strength in args.strength:
            after = measure(cross_fitted(pooled, strength))
            for (mode, name), a in after.iterrows():
                b = before.loc[(mode, name)]
                cells = " | ".join(f"{b[k]:.3f} -> {a[k]:.3f}" for k in KEYS)
                print(f"| {run.name} | {strength:g} | {mode} | {name} | {cells} |")


if __name__ == "__main__":
    main()
