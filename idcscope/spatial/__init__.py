"""Patches in place: the patient (or slide) grid and the spatial context built on it."""
