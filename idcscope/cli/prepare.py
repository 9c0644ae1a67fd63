"""``idcscope index``, ``synth`` and ``download``: the data, before any model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .app import app, fail, logger


@app.command()
def index(
    data_dir: Path,
    out: Annotated[Path | None, typer.Option(help="Write the manifest as CSV.")] = None,
) -> None:
    """Index a dataset folder and print what is in it."""
    from ..data.manifest import index_dataset, summarize
    from ..errors import IdcscopeError

    try:
        ix = index_dataset(data_dir)
    except IdcscopeError as e:
        raise fail(e) from e
    if out:
        ix.table.to_csv(out, index=False)
    print(
        json.dumps(
            {**summarize(ix.table), "layout": ix.layout, "n_skipped": len(ix.skipped)}, indent=2
        )
    )


@app.command()
def synth(
    out: Path,
    patients: Annotated[int, typer.Option(help="Number of synthetic patients.")] = 12,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a synthetic H&E-like dataset in the Kaggle layout (a stand-in, not a benchmark)."""
    from ..data.synthetic import make_synthetic_dataset

    counts = make_synthetic_dataset(out, n_patients=patients, seed=seed)
    logger.info("%d patches (%d IDC) in %s", counts["n_patches"], counts["n_positive"], out)


@app.command()
def download() -> None:
    """Download the Kaggle IDC dataset with kagglehub (needs network and Kaggle credentials)."""
    from ..data.download import download_kaggle
    from ..errors import IdcscopeError

    try:
        print(download_kaggle())
    except IdcscopeError as e:
        raise fail(e) from e
