"""Quantisation-aware training: fine-tune against int8 rounding, then convert to int8.

The QAT model is the same architecture with `compression.fake_quant` on: every
projection its layer declares quantizable (the ones int8 post-training quantisation
converts) becomes a `FakeQuantDense`, whose forward pass
rounds its kernel (per output channel) and its inputs (per token) to the int8
grid of Keras' `AbsMaxQuantizer`, with straight-through gradients. After
fine-tuning, the weights load into the float architecture and Keras'
`model.quantize("int8")` converts them; the converted model computes what the
QAT model computed (checked and recorded as `max_abs_logit_diff_qat_vs_int8`).
"""

from __future__ import annotations

import functools

import numpy as np

from deepseek_tf.compress.finetune import finetune
from deepseek_tf.compress.job import Plan, Result, check_float, check_int, run_job
from deepseek_tf.compress.quantization import check_request, float_model_for, quantize_model
from deepseek_tf.compress.run_io import Log, Source
from deepseek_tf.config.loader import update_config
from deepseek_tf.data.pipeline import make_eval_dataset
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import build_model

INCLUDE = ("attention", "ffn")


def qat_model_from(model, config):
    """The fake-quant twin of `model` (same weights)."""
    qat_config = update_config(config, compression={"fake_quant": True})
    qat_model = build_model(qat_config, model.vocab_size)
    qat_model.set_weights(model.get_weights())
    return qat_config, qat_model


def convert_to_int8(qat_model, config):
    """The float architecture with `qat_model`'s weights, quantized to int8 by Keras (in the
    quantization precision, see `quantization.quantization_precision`)."""
    float_config, float_model = float_model_for(config, qat_model, fake_quant=False)
    quantize_model(float_model, config.model, "int8", include=INCLUDE, bits=8, group_size=-1)
    return update_config(float_config, compression={"quantize": "int8"}), float_model


def quantization_aware_finetune(model, config, tokenizer, *, steps, learning_rate, log=print):
    """Returns `(int8_config, int8_model, qat_model)` after `steps` of QAT fine-tuning."""
    qat_config, qat_model = qat_model_from(model, config)
    finetune(qat_model, qat_config, tokenizer, steps=steps, learning_rate=learning_rate, log=log)
    int8_config, int8_model = convert_to_int8(qat_model, config)
    return int8_config, int8_model, qat_model


def qat(
    run_dir,
    *,
    out,
    steps: int = 300,
    learning_rate: float = 1e-4,
    quiet: bool = False,
) -> dict:
    """Quantisation-aware fine-tuning of a trained run, converted to int8 into a new run
    (`deepseek-tf compress qat`).

    Args:
        run_dir: the trained (float, not quantized) run.
        out: the new run directory.
        steps: fine-tuning steps against int8 rounding (at least 1).
        learning_rate: peak fine-tuning learning rate (> 0).
        quiet: no progress lines.

    Returns:
        The record (`compress.job`), with `options` {steps, learning_rate, mode: "int8"}
        and `max_abs_logit_diff_qat_vs_int8` (the QAT model against the converted one).

    Raises:
        CompressionError: an option out of range or a run QAT cannot take (before any work).

    Examples:
        >>> from deepseek_tf import compress
        >>> compress.qat("runs/tiny", out="runs/tiny-qat", steps=300)  # doctest: +SKIP
    """
    check_int("steps", steps)
    learning_rate = check_float("learning_rate", learning_rate)
    if steps < 1:
        raise CompressionError(f"--steps: QAT needs at least one training step, got {steps}")
    if learning_rate <= 0:
        raise CompressionError(f"--learning-rate: must be > 0, got {learning_rate}")

    def plan_for(config) -> Plan:
        check_request(config, "int8", INCLUDE, 8, -1)
        options = {"steps": steps, "learning_rate": learning_rate, "mode": "int8"}
        transform = functools.partial(_converted, steps=steps, learning_rate=learning_rate)
        return Plan("qat", options, transform)

    return run_job(run_dir, out, plan_for, quiet=quiet)


def _converted(source: Source, log: Log, *, steps: int, learning_rate: float) -> Result:
    """QAT fine-tuning of `source`, then int8 conversion (the job's transform)."""
    int8_config, int8_model, qat_model = quantization_aware_finetune(
        source.model,
        source.config,
        source.tokenizer,
        steps=steps,
        learning_rate=learning_rate,
        log=log,
    )
    ids = np.asarray(next(iter(_probe(source.config, source.tokenizer))), np.int32)
    diff = float(np.max(np.abs(np.asarray(qat_model(ids)) - np.asarray(int8_model(ids)))))
    return Result(int8_config, int8_model, {"max_abs_logit_diff_qat_vs_int8": diff})


def _probe(config, tokenizer):
    """A few validation sequences to compare the QAT and converted models on."""
    ds = make_eval_dataset(config.data, tokenizer, 4, split="val")
    return (inputs for inputs, _, _ in ds.take(1))
