"""Compiled XLA programs kept on disk between processes (TensorFlow's persistent cache).

A cold `deepseek-tf generate` or `serve` of a large checkpoint spends most of its time to
the first token compiling the decode and prefill programs (43 s of 43.5 s for the 1.46B
demonstration, `benchmarks/decode_real.py`). TensorFlow can keep XLA's compiled programs
in a directory, keyed by a fingerprint of the program and the compiler, so the next
process with the same model and shapes loads them instead of compiling (tracing the
Python still happens). The command line turns it on before TensorFlow is imported:

- `$DEEPSEEK_TF_XLA_CACHE`: the directory (default `~/.cache/deepseek-tf/xla`); `off`
  (or empty) disables it. Delete the directory to clear it.
- A `--tf_xla_persistent_cache_directory` already in `$TF_XLA_FLAGS` is left as it is.

Examples:

>>> env = {"DEEPSEEK_TF_XLA_CACHE": "/tmp/xla", "TF_XLA_FLAGS": "--tf_xla_auto_jit=0"}
>>> enable(env)
'/tmp/xla'
>>> env["TF_XLA_FLAGS"]
'--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory=/tmp/xla'
>>> enable({"DEEPSEEK_TF_XLA_CACHE": "off"}) is None
True
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

FLAG = "--tf_xla_persistent_cache_directory"
VARIABLE = "DEEPSEEK_TF_XLA_CACHE"


def enable(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Points TensorFlow's persistent XLA cache at the cache directory (in `environ`,
    default `os.environ`; only effective before TensorFlow reads its flags, i.e. before
    it is imported). Returns the directory, or None when disabled or set elsewhere."""
    environ = os.environ if environ is None else environ
    flags = environ.get("TF_XLA_FLAGS", "")
    if FLAG in flags:
        return None
    directory = environ.get(VARIABLE, str(Path.home() / ".cache" / "deepseek-tf" / "xla"))
    if directory.strip().lower() in ("", "off", "0", "none"):
        return None
    environ["TF_XLA_FLAGS"] = f"{flags} {FLAG}={directory}".strip()
    return directory
