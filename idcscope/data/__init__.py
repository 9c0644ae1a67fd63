"""Patches from disk to model input: index, decode, cache, split, stain, augment.

The Kaggle IDC patches are 50x50 px cut from slides scanned at 40x and downsampled to 2.5x
(4 µm/px); these two numbers are defined here once, and everything downstream of a
checkpoint reads them from its preprocessing.
"""

from pathlib import Path

PATCH_SIZE = 50
PATCH_MPP = 4.0
# One real patient of the Kaggle IDC dataset (CC0; Cruz-Roa et al. 2014, Janowczyk and
# Madabhushi 2016), 465 patches in the Kaggle layout, zipped as the web page takes a
# patient: shipped for the demo, and never seen by the shipped model.
DEMO_PATIENT_ZIP = Path(__file__).parent / "demo" / "9124.zip"


def demo_patients(folder: str | Path) -> Path:
    """The demo patient unpacked under ``folder`` (once); returns the dataset folder."""
    import zipfile

    folder = Path(folder)
    if not folder.is_dir():
        with zipfile.ZipFile(DEMO_PATIENT_ZIP) as archive:
            archive.extractall(folder)
    return folder
