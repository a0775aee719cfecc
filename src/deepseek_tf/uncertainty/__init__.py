"""Uncertainty: a model that knows when it does not know (the brief's section 8.1).

`metrics` (calibration and selective prediction), `predictive` (where the samples come
from: a gaussian head, MC dropout, an ensemble), `evaluate` (`eval --uncertainty`, OOD
detection), `calibrate` (temperature scaling), `plots` (PNG figures). TensorFlow
Probability supplies the distributions and statistics; Keras 3 stays the model API.
"""
