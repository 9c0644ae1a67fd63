"""Patient-level splits: stratified, seeded, written once to ``splits.json`` and reused.

A patient's patches always go to one side. ``method="random"`` reproduces the original
study's image-level split for comparison only: it leaks patients between train and test,
and every output built on it says so.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LEAK_WARNING = (
    "image-level random split: patches of the same patient are on both sides, so these numbers "
    "are optimistic and say little about new patients"
)


def _patients_by_positive_fraction(table: pd.DataFrame, rng: random.Random) -> list[str]:
    frac = table.groupby("patient")["label"].mean()
    patients = sorted(frac.index, key=str)
    rng.shuffle(patients)  # random order among equal fractions, then a stable sort
    return sorted(patients, key=lambda p: frac[p])


def _pick_one_per_stratum(patients: list[str], n: int, rng: random.Random) -> list[str]:
    """Cut the sorted list into ``n`` contiguous strata and draw one patient from each."""
    bounds = np.linspace(0, len(patients), n + 1).round().astype(int)
    return [rng.choice(patients[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def patient_split(
    table: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict:
    """Train/val/test lists of patient ids, stratified by each patient's IDC fraction."""
    rng = random.Random(seed)
    patients = _patients_by_positive_fraction(table, rng)
    n = len(patients)
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise DataError(
            f"only {n} patients: cannot hold out {n_val} for validation and {n_test} for test "
            "and keep one for training (lower --val-fraction/--test-fraction)"
        )
    test = _pick_one_per_stratum(patients, n_test, rng) if n_test else []
    rest = [p for p in patients if p not in test]
    val = _pick_one_per_stratum(rest, n_val, rng) if n_val else []
    train = [p for p in rest if p not in val]
    return {
        "method": "patient",
        "seed": seed,
        "train": sorted(train),
        "val": sorted(val),
        "test": sorted(test),
    }


def patient_folds(table: pd.DataFrame, k: int, seed: int = 0) -> list[list[str]]:
    """``k`` disjoint groups of patients with similar IDC fractions, for cross-validation."""
    rng = random.Random(seed)
    patients = _patients_by_positive_fraction(table, rng)
    if k < 2 or k > len(patients):
        raise DataError(f"cannot make {k} folds of {len(patients)} patients")
    folds: list[list[str]] = [[] for _ in range(k)]
    for start in range(0, len(patients), k):
        block = patients[start : start + k]
        order = rng.sample(range(k), k)
        for patient, fold in zip(block, order, strict=False):
            folds[fold].append(patient)
    return [sorted(f) for f in folds]


def random_split(
    table: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict:
    """The leaking image-level split, stored as its recipe (seed and fractions)."""
    return {
        "method": "random",
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "leaks_patients": True,
    }


def assign(table: pd.DataFrame, splits: dict) -> np.ndarray:
    """The split name of every row ("train", "val", "test", or "" for rows in no split)."""
    if splits.get("method") == "random":
        rng = np.random.default_rng(splits["seed"])
        u = rng.random(len(table))
        out = np.full(len(table), "train", dtype=object)
        out[u < splits["val_fraction"] + splits["test_fraction"]] = "val"
        out[u < splits["test_fraction"]] = "test"
        return out
    out = np.full(len(table), "", dtype=object)
    known = set(table["patient"])
    for name in SPLITS:
        members = set(map(str, splits.get(name, [])))
        missing = members - known
        if missing:
            logger.warning(
                "%d %s patients of the split are not in the data: %s",
                len(missing),
                name,
                ", ".join(sorted(missing)[:5]),
            )
        out[table["patient"].isin(members).to_numpy()] = name
    n_none = int((out == "").sum())
    if n_none:
        logger.warning("%d patches belong to patients in no split; they are left out", n_none)
    return out


def check_disjoint(splits: dict) -> None:
    if splits.get("method") == "random":
        return
    sets = {name: set(splits.get(name, [])) for name in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            both = sets[a] & sets[b]
            if both:
                raise DataError(f"patients in both {a} and {b}: {', '.join(sorted(both))}")


def load_splits(path: str | Path, table: pd.DataFrame | None = None, seed: int = 0) -> dict:
    """Read a split file: ``{"train": [...], "val": [...], "test": [...]}`` lists of patient ids.

    Without a "val" list, validation patients are drawn from "train" (seeded), so published
    train/test folds (e.g. Janowczyk's) can be used as they are; ``"val": []`` means none
    (a final model trained on every patient).
    """
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON split file ({e})") from e
    if not isinstance(splits, dict) or not any(k in splits for k in SPLITS):
        raise DataError(f"{path}: expected an object with 'train', 'val' and/or 'test' lists")
    splits.setdefault("method", "patient")
    draw_val = "val" not in splits  # an empty list means no validation patients at all
    for name in SPLITS:
        if not isinstance(splits.get(name, []), list):
            raise DataError(f"{path}: {name!r} must be a list of patient ids")
        splits[name] = [str(p) for p in splits.get(name, [])]
    if splits["method"] != "random" and draw_val and table is not None:
        train = table[table["patient"].isin(splits["train"])]
        inner = patient_split(train, val_fraction=0.15, test_fraction=0.0, seed=seed)
        splits["train"], splits["val"] = inner["train"], inner["val"]
        logger.info(
            "%s has no 'val' list: drew %d validation patients from 'train'",
            path,
            len(splits["val"]),
        )
    check_disjoint(splits)
    return splits


def save_splits(splits: dict, path: str | Path) -> Path:
    from .cache import write_atomic

    # a run killed while writing leaves no half a split for --resume to read
    return write_atomic(Path(path), json.dumps(splits, indent=2) + "\n")


def make_splits(
    table: pd.DataFrame, method: str, val_fraction: float, test_fraction: float, seed: int
) -> dict:
    """``method`` is "patient", "random", or the path of a split file."""
    if method == "patient":
        return patient_split(table, val_fraction, test_fraction, seed)
    if method == "random":
        logger.warning("--split random: %s", LEAK_WARNING)
        return random_split(table, val_fraction, test_fraction, seed)
    return load_splits(method, table, seed)
