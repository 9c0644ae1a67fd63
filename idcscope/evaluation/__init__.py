"""Measuring a model on held-out patients: metrics with patient-clustered intervals,
plots and the HTML report; ``evaluate`` scores through the Predictor and writes them."""
