"""Patches in place: the patient (or slide) grid, the spatial context built on it, patient
heatmaps rebuilt from patch coordinates and whole-slide inference."""
