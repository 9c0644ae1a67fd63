"""Patches from disk to model input: index, decode, cache, split, stain, augment.

The Kaggle IDC patches are 50x50 px cut from slides scanned at 40x and downsampled to 2.5x
(4 µm/px); these two numbers are defined here once, and everything downstream of a
checkpoint reads them from its preprocessing.
"""

from pathlib import Path

PATCH_SIZE = 50
PATCH_MPP = 4.0
# One real patient of the Kaggle IDC dataset (CC0; Cruz-Roa et al. 2014, Janowczyk and
# Madabhushi 2016), 465 patches, shipped for the demo: the shipped model never saw it.
DEMO_PATIENTS = Path(__file__).parent / "demo"
