"""Command-line interface (`deepseek-tf`)."""

import os

# Quiet TensorFlow's C++ INFO/WARNING lines; must be set before TensorFlow loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
