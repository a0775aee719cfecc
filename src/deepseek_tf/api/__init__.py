"""The Python API: one function per `deepseek-tf` command, with the command's options as
keyword arguments (`--max-new-tokens` -> `max_new_tokens`, `--set` -> `overrides`), the
same defaults and the same one-line errors (`deepseek_tf.errors`), returning what the
command prints. The command line is a thin layer over these functions.

=====================  =====================================  =======================
command                function                               module
=====================  =====================================  =======================
train                  `train`                                `api.training`
federated              `federated`                            `api.training`
info                   `info`                                 `api.info`
data prepare           `prepare_data`                         `api.data`
tokenizer train        `train_tokenizer`                      `api.data`
eval                   `evaluate`                             `api.evaluation`
calibrate              `calibrate`                            `api.evaluation`
generate               `generate`                             `api.generation`
export                 `export`                               `api.deployment`
serve                  `serve` (-> `Served`)                  `api.deployment`
convert                `convert_from_hf`, `convert_to_hf`     `api.conversion`
compress METHOD        `compress.quantize|qat|prune|...`      `deepseek_tf.compress`
(open a run)           `load`                                 `api.runs`
=====================  =====================================  =======================

Importing this package imports TensorFlow without its C++ start-up notices
(`deepseek_tf.quiet`), so a script is as quiet as the command line.

Examples:

>>> import deepseek_tf as ds                                          # doctest: +SKIP
>>> ds.train(preset="shakespeare-char", out="runs/char", sample_tokens=0,
...          overrides=["train.steps=50"])["step"]                    # doctest: +SKIP
50
>>> ds.generate("runs/char", "ROMEO:", max_new_tokens=20)             # doctest: +SKIP
['ROMEO:\\nWhat ...']
"""

# ruff: noqa: E402 - TensorFlow is imported quietly before the modules below load it
from deepseek_tf.quiet import import_tensorflow_quietly

import_tensorflow_quietly()

from deepseek_tf import compress
from deepseek_tf.api.conversion import convert_from_hf, convert_to_hf
from deepseek_tf.api.data import prepare_data, train_tokenizer
from deepseek_tf.api.deployment import Served, export, serve
from deepseek_tf.api.evaluation import calibrate, evaluate
from deepseek_tf.api.generation import generate
from deepseek_tf.api.info import info
from deepseek_tf.api.runs import load
from deepseek_tf.api.training import federated, train

__all__ = [
    "Served",
    "calibrate",
    "compress",
    "convert_from_hf",
    "convert_to_hf",
    "evaluate",
    "export",
    "federated",
    "generate",
    "info",
    "load",
    "prepare_data",
    "serve",
    "train",
    "train_tokenizer",
]
