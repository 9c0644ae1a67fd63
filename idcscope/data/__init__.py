"""Patches from disk to model input: index, decode, cache, split, stain, augment.

The Kaggle IDC patches are 50x50 px cut from slides scanned at 40x and downsampled to 2.5x
(4 µm/px); these two numbers are defined here once, and everything downstream of a
checkpoint reads them from its preprocessing.
"""

PATCH_SIZE = 50
PATCH_MPP = 4.0
