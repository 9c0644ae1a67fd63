"""Explanation study: do the maps point at what moves the shipped model? A deletion test.

    python benchmarks/explain_study.py [--patients 9124 8913 10254 8975] [--per-patient 50]

Protocol. Each patient's whole folder of the real sample is read and turned into model
input as ``predict`` does (``data.preprocess``: stain, neighbourhood planes from the
patient's own patches); then ``--per-patient`` patches of each patient (a seeded draw,
half IDC-labelled where the patient has enough) are explained with the shipped model
(``idc-default``). A position is one pixel of one plane group (the patch's RGB at that
pixel, or the neighbourhood planes' RGB at that cell: 3x3 pixels of the block), so a
6-plane input has 5,000. The top k% of positions by each ranking are set to a fill, and
P(IDC) (the model's softmax, before spatial context and calibration) is read again:

* ``IG, both groups``: ``inference.attribution`` (Integrated Gradients from glass, 16 steps);
* ``HiResCAM, patch``: the map ``explain`` drew before, over the patch planes only;
* ``random, both groups`` / ``random, patch``: uniform noise rankings (mean of 3 draws).

Fills: glass (white, what a missing neighbour already is) and the patient's mean colour
(per plane, over all its patches' model input). A faithful map of evidence for IDC moves
P(IDC) down more than random does. The table gives the mean change over all patches and
over those the model called IDC (P >= 0.5 before), and how often the map beat random.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import SAMPLE, machine, setup_torch, table

FRACTIONS = (0.05, 0.1, 0.2)


def patient_inputs(predictor, patient: str, n: int, rng: np.random.Generator):
    """(uint8 model input of ``n`` drawn patches, their labels, the patient's mean planes)."""
    from idcscope.data.manifest import index_files

    t = index_files([SAMPLE / patient]).table
    scored = predictor.score_files(t, keep_patches=True, desc=patient)
    ok = scored.ok
    xy = (t["x"].to_numpy()[ok], t["y"].to_numpy()[ok])
    inputs = predictor.model_input(scored.patches, t["patient"].to_numpy()[ok], xy)
    labels = t["label"].to_numpy()[ok]
    pick = []
    for c in (1, 0):
        pool = np.flatnonzero(labels == c)
        pick += list(rng.choice(pool, size=min(len(pool), n // 2), replace=False))
    rest = np.setdiff1d(np.arange(len(labels)), pick)
    pick += list(rng.choice(rest, size=max(0, n - len(pick)), replace=False))
    pick = np.sort(np.asarray(pick[:n], dtype=np.int64))
    mean = inputs.reshape(len(inputs), inputs.shape[1], -1).mean((0, 2)) / 255.0
    return inputs[pick], labels[pick], np.broadcast_to(mean, (len(pick), len(mean)))


def rankings(model, prep, x, target: int, steps: int, rng: torch.Generator) -> dict:
    from idcscope.inference.attribution import glass_input, group_maps, integrated_gradients
    from idcscope.inference.explain import GradCAM

    ig = torch.from_numpy(
        group_maps(integrated_gradients(model, x, glass_input(prep, x), target, steps))
    )
    with GradCAM(model, method="hirescam") as cam:
        hires = cam(x, target)
    off = torch.full_like(hires, -1.0)  # ranks below every CAM value: never removed
    return {
        "IG, both groups": ig,
        "HiResCAM, patch": torch.stack([hires, off], 1),
        "random, both groups": [torch.rand(ig.shape, generator=rng) for _ in range(3)],
        "random, patch": [
            torch.stack([torch.rand(hires.shape, generator=rng), off], 1) for _ in range(3)
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", nargs="+", default=["9124", "8913", "10254", "8975"])
    ap.add_argument("--per-patient", type=int, default=50)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    setup_torch()
    from idcscope.data.preprocess import Preprocessing, to_float
    from idcscope.inference.attribution import deletion, glass_input
    from idcscope.inference.predictor import Predictor
    from idcscope.models.bundle import resolve_model
    from idcscope.models.checkpoint import load_model

    path = resolve_model("idc-default")
    predictor = Predictor(path)
    model, ckpt = load_model(path)
    prep = Preprocessing(**ckpt["preprocessing"])
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    drops: dict[tuple[str, str], list[np.ndarray]] = {}
    before, splits, gaps, seconds = [], [], [], 0.0
    for patient in args.patients:
        inputs, _, mean = patient_inputs(predictor, patient, args.per_patient, rng)
        x = prep(to_float(inputs))
        glass = glass_input(prep, x)
        fills = {
            "glass": glass,
            "patient mean": (
                (torch.from_numpy(mean[:1].copy()).float() - torch.tensor(prep.mean))
                / torch.tensor(prep.std)
            ).view(1, -1, 1, 1),
        }
        start = time.perf_counter()
        ranks = rankings(model, prep, x, 1, args.steps, gen)
        seconds += time.perf_counter() - start
        with torch.no_grad():
            logits = model.eval()(x)
            before.append(torch.softmax(logits, 1)[:, 1].numpy())
            delta = logits[:, 1] - model(glass.expand_as(x))[:, 1]
        ig = ranks["IG, both groups"]
        splits.append(ig.sum((2, 3)).numpy())
        gaps.append((ig.sum((1, 2, 3)) - delta).abs().numpy())
        for fill_name, fill in fills.items():
            for name, rank in ranks.items():
                runs = rank if isinstance(rank, list) else [rank]
                d = np.mean([deletion(model, x, r, FRACTIONS, fill) for r in runs], 0)
                drops.setdefault((fill_name, name), []).append(d)
    p0 = np.concatenate(before)
    called = p0 >= 0.5
    rows = []
    for (fill_name, name), parts in drops.items():
        d = np.concatenate(parts, 1)  # (fractions, N)
        rnd = np.concatenate(drops[(fill_name, "random, both groups")], 1)
        row = {"fill": fill_name, "ranking": name}
        for f, df, dr in zip(FRACTIONS, d, rnd, strict=True):
            k = f"{round(f * 100)}%"
            row[f"dP {k}, all"] = float(df.mean())
            row[f"dP {k}, called IDC"] = float(df[called].mean()) if called.any() else float("nan")
            row[f"beats random {k}"] = f"{(df < dr).mean():.0%}" if name.startswith("IG") else ""
        rows.append(row)
    split = np.concatenate(splits)
    print(f"# Explanation study: deletion test, idc-default\n\n{machine()}\n")
    print(
        f"{len(p0)} patches of patients {', '.join(args.patients)}; {int(called.sum())} called "
        f"IDC; mean P(IDC) {p0.mean():.3f}. IG from glass, {args.steps} steps: "
        f"{seconds / len(p0) * 1000:.0f} ms a patch for all maps; completeness gap "
        f"|sum - (logit(x) - logit(glass))| median {np.median(np.concatenate(gaps)):.3f}, "
        f"90th percentile {np.quantile(np.concatenate(gaps), 0.9):.3f} logit. "
        f"Mean attribution: patch planes {split[:, 0].mean():+.2f}, "
        f"neighbourhood planes {split[:, 1].mean():+.2f} logit "
        f"(called IDC: {split[called, 0].mean():+.2f}, {split[called, 1].mean():+.2f}).\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
