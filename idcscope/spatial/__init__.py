"""Patches in place: patient heatmaps rebuilt from patch coordinates (on the grid of
``data.grid``) and whole-slide inference."""
