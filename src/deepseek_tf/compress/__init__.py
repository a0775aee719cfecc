"""Compression of trained runs for Keras 3: quantisation (PTQ, QAT), structured pruning,
distillation and low-rank factorisation.

Every method reads a run directory and writes a new one that `deepseek-tf eval/generate/
export/serve` load like any other, through the one job of `compress.job` (load, measure,
transform, record, write), and returns the record it appended to the new run's
`compression.json`:

>>> from deepseek_tf import compress
>>> compress.quantize("runs/tiny", out="runs/tiny-int8", mode="int8")  # doctest: +SKIP
{'method': 'quantize', 'options': {...}, 'val_loss_before': ..., 'val_loss_after': ...}

The keyword arguments are those of `deepseek-tf compress METHOD` (flag `--group-size` is
keyword `group_size`, `--set` is `overrides`), with the same defaults and checks.
The building blocks that work on models in memory live in the method modules:
`quantization.quantize_model`, `quantization_aware.quantization_aware_finetune`,
`pruning.prune_model`, `distillation.distill_model`, `low_rank.factorize`.
"""

from deepseek_tf.compress.distillation import distill
from deepseek_tf.compress.low_rank import lowrank
from deepseek_tf.compress.pruning import prune
from deepseek_tf.compress.quantization import quantize
from deepseek_tf.compress.quantization_aware import qat

__all__ = ["distill", "lowrank", "prune", "qat", "quantize"]
