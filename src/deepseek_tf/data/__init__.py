"""Corpus handling, tf.data pipelines and augmentation.

The bundled corpus is `tinyshakespeare.txt` next to this file. The public names below are
imported lazily, so `deepseek_tf.data.corpus` stays usable without importing TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "default_corpus_path": "corpus",
    "read_texts": "corpus",
    "resolve_files": "corpus",
    "split_text": "corpus",
    "make_train_dataset": "pipeline",
    "make_eval_dataset": "pipeline",
    "packed_length": "augment",
    "replace_tokens": "augment",
    "jitter_weights": "augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepseek_tf.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"deepseek_tf.data.{module}"), name)
