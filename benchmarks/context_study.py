"""Context study: a learned model over the patient's grid of logits, in place of Gaussian smoothing.

    python benchmarks/context_study.py runs/idc-default      # an `idcscope cv` folder

Each fold model of the run scores its test patients without smoothing (whole, and from the
random share of each patient's patches that cv kept for its thinned rows). Then, cross-fitted
over the folds (fitted on two folds' patients, applied to the third's):

- **gaussian**: the shipped way, the logits averaged over a Gaussian of the width the fold
  model fitted on its validation patients;
- **rings**: logistic regression on the patch's own logit and, for the rings of
  neighbours at 1, 2 and 3 patches, how far their mean and maximum are from it, weighted
  by the share of the ring present (absent neighbours count as nothing: a lone patch keeps
  its own logit);
- **rings + patient**: boosted trees on the same plus the patient's own logit quantiles
  and patch count (a baseline set by the patient's own tissue).

All three are then calibrated and called by context as the shipped model is, and compared
paired by patient (``training.selection.compare``; one run, so only the patients' noise).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from idcscope.data import splits as splitting
from idcscope.data.grid import neighbour_rows, smooth
from idcscope.data.manifest import index_datasets
from idcscope.inference.predictor import Predictor
from idcscope.training import selection
from idcscope.training.contexts import cross_fitted

RADIUS = 3


def raw_margins(run: Path, data: list[str], out: Path) -> pd.DataFrame:
    """Every fold model's unsmoothed logit margins on its test patients (cached in ``out``)."""
    cache = out / "raw_margins.csv"
    if cache.exists():
        return pd.read_csv(cache, dtype={"patient": str})
    index, frames = index_datasets(data, read_sizes=False), []
    for fold_dir in sorted(run.glob("fold*")):
        predictor = Predictor(fold_dir / "best.pt")
        member = predictor.members[0]
        sigma = member.meta.context.get("sigma", 0.0)
        predictor.members[0] = dataclasses.replace(
            member, meta=dataclasses.replace(member.meta, context={})
        )
        test = index.table[splitting.assign(index.table, member.meta.splits) == "test"]
        kept = set(pd.read_csv(fold_dir / "eval_thinned" / "predictions.csv")["path"])
        for mode, table in (("context", test), ("thinned", test[test["path"].isin(kept)])):
            table = table.reset_index(drop=True)
            s = predictor.score_files(table, index.root, desc=f"{fold_dir.name} {mode}")
            frames.append(table[["path", "patient", "x", "y", "label"]][s.ok].assign(
                raw=s.margin[s.ok], neighbours=s.neighbours[s.ok], sigma=sigma,
                fold=int(fold_dir.name[4:]), scored=mode,
            ))  # fmt: skip
    frame = pd.concat(frames, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(cache, index=False)
    return frame


def grid_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Per patch: its logit, each ring's mean and maximum logit relative to it weighted by
    the ring's share present, and the share; its patient's logit quantiles and size."""
    m = frame["raw"].to_numpy()
    nb = neighbour_rows(
        frame["patient"].to_numpy(), *(frame[c].to_numpy(float) for c in "xy"), RADIUS
    )
    k = 2 * RADIUS + 1
    dy, dx = np.divmod(np.arange(k * k), k)
    ring = np.maximum(abs(dy - RADIUS), abs(dx - RADIUS))
    cols = {"own": m}
    for r in range(1, RADIUS + 1):
        idx = nb[:, ring == r]
        present = idx >= 0
        values = m[np.clip(idx, 0, None)]
        n = present.sum(1)
        share = n / present.shape[1]
        mean = np.where(n > 0, np.where(present, values, 0).sum(1) / np.maximum(n, 1), m)
        top = np.where(n > 0, np.where(present, values, -np.inf).max(1), m)
        cols |= {f"mean{r}": (mean - m) * share, f"max{r}": (top - m) * share, f"share{r}": share}
    by = frame.groupby("patient")["raw"]
    for q in (0.1, 0.5, 0.9):
        cols[f"patient_q{q}"] = by.transform(lambda v, q=q: np.quantile(v, q)).to_numpy()
    cols["patient_log_n"] = np.log1p(by.transform("size").to_numpy())
    return pd.DataFrame(cols, index=frame.index)


def learned(frame: pd.DataFrame, features: pd.DataFrame, make) -> np.ndarray:
    """The logit of ``make()``'s P(IDC) from ``features``, fitted on the other folds."""
    out = np.zeros(len(frame))
    for fold in sorted(frame["fold"].unique()):
        mine = (frame["fold"] == fold).to_numpy()
        model = make().fit(features[~mine], frame["label"][~mine])
        p = np.clip(model.predict_proba(features[mine])[:, 1], 1e-6, 1 - 1e-6)
        out[mine] = np.log(p / (1 - p))
    return out


def main() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="an idcscope cv folder (its fold models)")
    ap.add_argument(
        "--data", nargs="+", default=["../shared/data/idc-sample", "../shared/data/idc-scatter"]
    )
    ap.add_argument("--out", type=Path, default=Path("runs/context_study"))
    args = ap.parse_args()
    frames = []
    for _, part in raw_margins(args.run, args.data, args.out).groupby("scored"):
        part = part.reset_index(drop=True)  # a mode's rows are one grid: whole or thinned
        smoothed = np.concatenate([
            smooth(f["raw"], f["patient"], f["x"], f["y"], f["sigma"].iloc[0])
            for _, f in part.groupby("fold")
        ])  # fmt: skip
        part = pd.concat([f for _, f in part.groupby("fold")], ignore_index=True)
        frames.append(pd.concat([part.assign(gaussian=smoothed), grid_features(part)], axis=1))
    frame = pd.concat(frames, ignore_index=True)
    rings = [c for c in frame if c.startswith(("mean", "max", "share"))] + ["own"]
    patient = rings + [c for c in frame if c.startswith("patient_")]
    arms = {
        "gaussian": frame["gaussian"].to_numpy(),
        "rings": learned(frame, frame[rings], lambda: LogisticRegression(max_iter=2000)),
        "rings + patient": learned(frame, frame[patient], lambda: HistGradientBoostingClassifier(
            max_iter=200, learning_rate=0.05, max_leaf_nodes=15, l2_regularization=1.0)),
    }  # fmt: skip
    decided = {}
    for name, margin in arms.items():
        d = cross_fitted(frame.assign(margin=margin), ("youden", 0.9))
        decided[name] = d.assign(cohort=d["scored"] + "/" + d["path"].str.split("/").str[0])
    for name in ("rings", "rings + patient"):
        table = selection.compare([decided["gaussian"]], [decided[name]])
        print(f"## {name} against gaussian\n\n{selection.markdown(table, ('gaussian', name))}\n")


if __name__ == "__main__":
    main()
