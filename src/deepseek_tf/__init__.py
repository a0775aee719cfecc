"""deepseek-tf: build, train, compress and serve DeepSeek-class models with TensorFlow/Keras 3.

Importing the package is cheap; TensorFlow loads on first use of a model API.
"""

from deepseek_tf.api import load, train
from deepseek_tf.config.loader import load_config
from deepseek_tf.config.schema import Config, DataConfig, ModelConfig, RuntimeConfig, TrainConfig

__version__ = "0.1.0"

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "RuntimeConfig",
    "TrainConfig",
    "build_model",
    "load",
    "load_config",
    "parameter_count",
    "train",
]


def __getattr__(name):
    if name == "build_model":
        from deepseek_tf.models.builder import build_model

        return build_model
    if name == "parameter_count":
        from deepseek_tf.models.builder import parameter_count

        return parameter_count
    raise AttributeError(f"module 'deepseek_tf' has no attribute {name!r}")
