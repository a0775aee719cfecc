"""deepseek-tf: build, train, compress and serve DeepSeek-class models with TensorFlow/Keras 3.

The Python API is one function per `deepseek-tf` command (`deepseek_tf.api`), with the
command's options as keyword arguments:

>>> import deepseek_tf as ds                                                # doctest: +SKIP
>>> ds.train(preset="shakespeare-char", out="runs/char", overrides=["train.steps=50"])
... # doctest: +SKIP
>>> ds.evaluate("runs/char")["loss"]                                        # doctest: +SKIP
>>> ds.compress.quantize("runs/char", out="runs/char-int8", mode="int8")   # doctest: +SKIP

Importing the package is cheap (the command line's `--help` does not load TensorFlow):
the names below are loaded from their modules on first use (PEP 562), and TensorFlow,
when a name needs it, is imported without its C++ start-up notices (`deepseek_tf.quiet`).

`deepseek_tf.export` and `deepseek_tf.federated` are the verbs even after their
subpackages of the same names are imported (`from deepseek_tf.export import savedmodel`,
`from deepseek_tf.federated.engine import FederatedRun` reach those, as before; what
`import deepseek_tf.export as x` binds is the verb).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_API = "deepseek_tf.api"
_EXPORTS = {
    "Config": "deepseek_tf.config.schema",
    "DataConfig": "deepseek_tf.config.schema",
    "ModelConfig": "deepseek_tf.config.schema",
    "RuntimeConfig": "deepseek_tf.config.schema",
    "TrainConfig": "deepseek_tf.config.schema",
    "FederatedConfig": "deepseek_tf.config.schema",
    "load_config": "deepseek_tf.config.loader",
    "update_config": "deepseek_tf.config.loader",
    "build_model": "deepseek_tf.models.builder",
    "parameter_count": "deepseek_tf.models.builder",
    "RunDir": "deepseek_tf.rundir",
    # the verbs of the command line (deepseek_tf.api): its options as keywords
    "load": _API,
    "train": _API,
    "federated": _API,
    "info": _API,
    "prepare_data": _API,
    "train_tokenizer": _API,
    "evaluate": _API,
    "calibrate": _API,
    "generate": _API,
    "export": _API,
    "serve": _API,
    "Served": _API,
    "convert_from_hf": _API,
    "convert_to_hf": _API,
    "compress": "deepseek_tf.compress",  # a package: compress.quantize(...), ...
}

__all__ = sorted(_EXPORTS)
_VERBS_NAMED_LIKE_SUBPACKAGES = ("export", "federated")


class _Package(types.ModuleType):
    """The package module, keeping `export` and `federated` the verbs: importing a
    subpackage binds it as an attribute of its parent, which would hide the verb."""

    def __setattr__(self, name, value):
        if name in _VERBS_NAMED_LIKE_SUBPACKAGES and isinstance(value, types.ModuleType):
            return  # the subpackage stays in sys.modules, reached by `from ... import`
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepseek_tf' has no attribute {name!r}")
    if not module.startswith("deepseek_tf.config"):  # these load TensorFlow: quietly
        importlib.import_module("deepseek_tf.quiet").import_tensorflow_quietly()
    target = importlib.import_module(module)
    return target if module == f"{__name__}.{name}" else getattr(target, name)
