"""deepseek-tf: build, train, compress and serve DeepSeek-class models with TensorFlow/Keras 3.

Importing the package is cheap (the command line's `--help` does not load TensorFlow):
the names below are loaded from their modules on first use (PEP 562).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "deepseek_tf.config.schema",
    "DataConfig": "deepseek_tf.config.schema",
    "ModelConfig": "deepseek_tf.config.schema",
    "RuntimeConfig": "deepseek_tf.config.schema",
    "TrainConfig": "deepseek_tf.config.schema",
    "load_config": "deepseek_tf.config.loader",
    "build_model": "deepseek_tf.models.builder",
    "parameter_count": "deepseek_tf.models.builder",
    "RunDir": "deepseek_tf.rundir",
    "load": "deepseek_tf.api",
    "train": "deepseek_tf.api",
    "train_federated": "deepseek_tf.api",
    # the command line's verbs (deepseek_tf.verbs): the same options and defaults
    "evaluate": "deepseek_tf.verbs",
    "generate": "deepseek_tf.verbs",
    "export_run": "deepseek_tf.verbs",
    "serve": "deepseek_tf.verbs",
    "compress_run": "deepseek_tf.verbs",
    "convert_checkpoint": "deepseek_tf.verbs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepseek_tf' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
