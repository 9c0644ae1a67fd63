"""A model's input check (``data.inputcheck``), fitted on the patients it learnt from.

The check learns what the model's own training patches look like, so it is fitted on
them: their real patches and what ``out_of_spec`` makes of them (zoomed, re-stained, not
H&E, glass), with 2x2 blocks of neighbours for the zoomed-out ones. A few thousand real
patches spread over every patient say as much as all of them (the threshold is a quantile
over patients), and the fit's time grows with the patches, so they are capped
(``MAX_PATCHES``), an equal share per patient. ``fit_model_check`` is the fit a training
run makes; ``check_model`` adds one to (or refits the one of) a model already made, from
its train and validation patients only, and measures it on its test patients.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..data import inputcheck as ic
from ..data import splits as splitting
from ..data.dataset import PatchData, load_patch_data
from ..errors import IdcscopeError

logger = logging.getLogger(__name__)

# Real patches the fit reads (with what it makes of them, 4.5 times as many): 25 s on 2
# busy cores, where all 25,000 of the sample and scatter patients take 130 s, and unseen
# patients' real patches flagged as with 16,000 (1.9% and 2.2%, 4x zoomed 99.8% both).
MAX_PATCHES = 8000


def fit_model_check(
    data: PatchData,
    rows: np.ndarray,
    seed: int = 0,
    flag_rate: float = ic.FLAG_RATE,
    max_patches: int = MAX_PATCHES,
) -> dict:
    """The input check's JSON parameters (``ModelMeta.input_check``), fitted on the patches
    of ``data`` at ``rows`` (a model's training patients; unreadable rows are skipped).

    At most ``max_patches`` real patches are read, an equal share per patient (all of
    those with fewer), drawn with ``seed``, as are the neighbour blocks zoomed out.
    """
    rows = np.asarray(rows, dtype=np.int64)
    rows = rows[data.ok[rows]]
    if not len(rows):
        raise IdcscopeError(f"{data.root}: no readable patches to fit the input check on")
    rng = np.random.default_rng(seed)
    patients = data.patients[rows].astype(str)
    fit = rows[_equal_shares(patients, max_patches, rng)]
    groups = data.patients[fit].astype(str)
    wide, wide_groups = _blocks(data, rows, len(fit) // 2, rng)
    x, reasons, g = ic.out_of_spec(data.images[fit], groups, rng, wide, wide_groups)
    params = ic.fit_input_check(x, reasons, g, flag_rate=flag_rate, seed=seed)
    logger.info(
        "input check: fitted on %d real patches of %d patients (%d neighbour blocks), "
        "%d made ones; flags P(ok) < %.4f",
        len(fit), params["n_patients"], len(wide), len(x) - len(fit), params["threshold"],
    )  # fmt: skip
    return params


def check_model(
    model: str | Path,
    data_root: str | Path | list,
    seed: int = 0,
    flag_rate: float = ic.FLAG_RATE,
    cache_dir: str | Path | None = None,
) -> dict:
    """Fit ``model``'s input check (a ``.pt`` or a model folder; one it has is replaced) on
    its train and validation patients found in ``data_root``, and write it into the model.

    Its test patients (``ModelMeta.splits``) are never fitted on: those in the data are
    where the check is measured, as on patients it never saw. Returns what was done: the
    patients and real patches fitted on, the test patients' and the share of their real
    patches flagged (None without any), by reason.

    Raises:
        IdcscopeError: the model is an ONNX graph, records no split, or none of its train
            and validation patients are in the data.
    """
    from ..models.checkpoint import read_meta, update_model

    path = Path(model)
    _refuse_onnx(path)  # before the fit, not after
    meta = read_meta(path)
    if not meta.splits:
        raise IdcscopeError(
            f"{path}: the model records no split, so which patients it was tested on is "
            "unknown and the check could be fitted on them"
        )
    if meta.splits.get("method") == "random":
        logger.warning(
            "%s: %s; test patches' patients are fitted on too", path, splitting.LEAK_WARNING
        )
    data = load_patch_data(data_root, cache_dir)
    split = splitting.assign(data.table, meta.splits)
    fit, test = data.rows(np.isin(split, ("train", "val"))), data.rows(split == "test")
    if not len(fit):
        raise IdcscopeError(
            f"{data.root}: none of the model's {len(meta.seen_patients)} train and "
            f"validation patients are here ({len(set(data.patients[test]))} of its test "
            "patients are, which the check is never fitted on)"
        )
    params = fit_model_check(data, fit, seed, flag_rate)
    reasons = ic.check_patches(params, data.images[test])
    update_model(path, input_check=params)
    return {
        "model": str(path),
        "n_patients": params["n_patients"],
        "n_patches": params["n_fit"]["ok"],
        "threshold": params["threshold"],
        "flag_rate": flag_rate,
        "n_test_patients": len(set(data.patients[test])),
        "n_test_patches": len(test),
        "test_flag_rate": float((reasons != "ok").mean()) if len(test) else None,
        "test_reasons": {str(r): int((reasons == r).sum()) for r in np.unique(reasons)},
    }


def _refuse_onnx(path: Path) -> None:
    if path.suffix == ".onnx":
        raise IdcscopeError(
            f"{path}: an ONNX graph's fields are written once, at export: add the check to "
            "the checkpoint it was exported from, then export it again"
        )


def _equal_shares(groups: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of at most ``total`` items, an equal share of each group (all of a
    group smaller than the share, its leftover shared by the others)."""
    names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if counts.sum() <= total:
        return np.arange(len(groups))
    share = _largest_share(counts, total)
    picked = []
    for k in range(len(names)):
        mine = np.flatnonzero(inverse == k)
        picked.append(mine if len(mine) <= share else rng.choice(mine, share, replace=False))
    return np.sort(np.concatenate(picked))


def _largest_share(counts: np.ndarray, total: int) -> int:
    """The largest ``s`` with ``sum(min(counts, s)) <= total``."""
    lo, hi = 0, int(counts.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(counts, mid).sum() <= total else (lo, mid - 1)
    return lo


def _blocks(data: PatchData, rows: np.ndarray, total: int, rng: np.random.Generator):
    """At most ``total`` 2x2 blocks of neighbours among ``rows`` (``data.inputcheck.blocks``),
    an equal share per patient, and their patients. Found on 1x1 stand-ins first, then
    made a patient at a time: every block of 25,000 patches would take gigabytes."""
    patients = data.patients[rows].astype(str)
    xs, ys = data.table["x"].to_numpy()[rows], data.table["y"].to_numpy()[rows]
    stand_in = np.zeros((len(rows), 1, 1, 3), np.uint8)
    corners, _ = ic.blocks(stand_in, patients, xs, ys)  # positions in ``rows``
    keep = corners[_equal_shares(patients[corners], total, rng)]
    found, owners = [], []
    for name in np.unique(patients[keep]):
        mine = np.flatnonzero(patients == name)
        at, wide = ic.blocks(data.images[rows[mine]], patients[mine], xs[mine], ys[mine])
        found.append(wide[np.isin(mine[at], keep)])
        owners.append(np.full(len(found[-1]), name))
    if not found:
        return None, None
    return np.concatenate(found), np.concatenate(owners)
