"""Fetch the Kaggle IDC dataset with kagglehub (online, logged in) or point at a local copy."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError

logger = logging.getLogger(__name__)

KAGGLE_DATASET = "paultimothymooney/breast-histopathology-images"


def download_kaggle(dataset: str = KAGGLE_DATASET) -> Path:
    """Download (or reuse kagglehub's cached copy of) the dataset; returns its folder."""
    try:
        import kagglehub
    except ImportError as e:
        raise DataError(
            "kagglehub is not installed: pip install 'idcscope[kaggle]', or download "
            f"https://www.kaggle.com/datasets/{dataset} by hand and pass its folder"
        ) from e
    try:
        path = Path(kagglehub.dataset_download(dataset))
    except Exception as e:  # network, credentials and API errors all end here
        raise DataError(
            f"could not download {dataset} from Kaggle ({type(e).__name__}: {e}). It needs a "
            "network connection and Kaggle credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME"
            " and KAGGLE_KEY); or download and extract it by hand and pass the folder"
        ) from e
    logger.info("Kaggle IDC dataset at %s", path)
    return path
