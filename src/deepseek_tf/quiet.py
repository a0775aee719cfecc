"""TensorFlow's start-up noise, silenced for the library and the command line.

Importing TensorFlow 2.21 prints 6-8 lines to the process's stderr from C++ before its
logging is configured (`TF_CPP_MIN_LOG_LEVEL` does not reach them), among them
`E0000 ... failed call to cuInit: UNKNOWN ERROR (303)`, which reads like a failure on a
CPU-only machine. `import_tensorflow_quietly` imports TensorFlow and initialises its
devices with file descriptor 2 pointed at a temporary file, then writes back every line
that is not one of those known notices, so a real error is never hidden.

The Python API (`deepseek_tf.api`, and the names `deepseek_tf` exports) calls it before
its first TensorFlow import, so a script is as quiet as `deepseek-tf`; the command line's
`-v/--verbose` imports TensorFlow plainly first, which shows the notices.

Examples:

>>> from deepseek_tf.quiet import NOISE
>>> bool(NOISE.match("I0000 00:00:1.0  1 port.cc:153] oneDNN custom operations are on."))
True
>>> bool(NOISE.match("Traceback (most recent call last):"))
False
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import tempfile

# Notices TensorFlow prints on every start (a CPU-only machine, oneDNN, CPU features).
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IW]\d{4} .*\] "  # informational and warning lines from C++
    r"|E\d{4} .*(cuInit|cuda_platform|cuda_dnn|cuda_fft|cuda_blas|Unable to register)"
    r"|To enable the following instructions:"
    r"|.*rebuild TensorFlow with the appropriate compiler flags)"
)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and lists its devices, dropping the start-up notices.

    Does nothing when TensorFlow is already imported (its notices, if any, are out).
    TensorFlow is imported by name (`importlib`): this module is the one place that
    decides how it starts, and stays importable without loading it.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # later C++ info lines (XLA's)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            tf = importlib.import_module("tensorflow")
            tf.config.list_physical_devices()  # device discovery prints the cuInit line
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
    kept = [line for line in text.splitlines() if line.strip() and not NOISE.match(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr)
