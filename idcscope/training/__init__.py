"""Learning a model: the config, the loop, the objective, the fitting after training
(temperature, threshold, context width) and patient-level cross-validation.

``train.train(cfg)`` is the whole run: data (``data``), model (``models``), epochs
(``loop``), checkpoints, then ``posthoc`` fits what the Predictor applies.
"""
