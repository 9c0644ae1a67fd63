"""A dataset folder, indexed and decoded: the manifest, the patch array and what was skipped."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import load_or_build
from .manifest import index_datasets, summarize

logger = logging.getLogger(__name__)


@dataclass
class PatchData:
    """Manifest rows aligned with decoded patches; ``ok`` is False for files that failed."""

    root: Path
    layout: str
    table: pd.DataFrame
    images: np.ndarray
    ok: np.ndarray
    skipped: list[tuple[str, str]]
    n_padded: int
    n_files: int

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy()

    @property
    def patients(self) -> np.ndarray:
        return self.table["patient"].to_numpy()

    def rows(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Indices of usable rows, optionally restricted by a boolean mask."""
        keep = self.ok if mask is None else self.ok & mask
        return np.flatnonzero(keep)

    def summary(self) -> dict:
        """Counts that account for every file: ``n_patches + n_skipped == n_files``."""
        return {
            **summarize(self.table[self.ok]),
            "n_files": self.n_files,
            "n_skipped": len(self.skipped),
            "n_padded": self.n_padded,
            "layout": self.layout,
        }


def load_patch_data(
    root: str | Path | list,
    cache_dir: str | Path | None = None,
    rebuild_cache: bool = False,
    workers: int | None = None,
) -> PatchData:
    """Index ``root`` (a dataset folder, or several: ``index_datasets``) and decode its
    patches (from the cache when already decoded)."""
    index = index_datasets(root)
    decoded = load_or_build(
        index.root,
        index.table,
        Path(cache_dir) if cache_dir else None,
        rebuild=rebuild_cache,
        workers=workers,
    )
    root_path = index.root
    failures = [(str(Path(p).relative_to(root_path)), r) for p, r in decoded.errors]
    data = PatchData(
        root=root_path,
        layout=index.layout,
        table=index.table,
        images=decoded.images,
        ok=decoded.ok,
        skipped=index.skipped + failures,
        n_padded=decoded.n_padded,
        n_files=len(index.table) + len(index.skipped),
    )
    s = data.summary()
    logger.info(
        "%s: %d patches of %d patients (%.1f%% IDC), %d padded, %d skipped",
        root_path,
        s["n_patches"],
        s["n_patients"],
        100 * s["positive_fraction"],
        s["n_padded"],
        s["n_skipped"],
    )
    return data
