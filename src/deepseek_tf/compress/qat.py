"""Quantisation-aware training: fine-tune against int8 rounding, then convert to int8.

The QAT model is the same architecture with `model.fake_quant` on: every
projection its layer declares quantizable (the ones int8 post-training quantisation
converts) becomes a `FakeQuantDense`, whose forward pass
rounds its kernel (per output channel) and its inputs (per token) to the int8
grid of Keras' `AbsMaxQuantizer`, with straight-through gradients. After
fine-tuning, the weights load into the float architecture and Keras'
`model.quantize("int8")` converts them; the converted model computes what the
QAT model computed (checked and recorded as `max_abs_logit_diff_qat_vs_int8`).
"""

from __future__ import annotations

import time

import numpy as np

from deepseek_tf.compress.finetune import finetune, validation_loss
from deepseek_tf.compress.quantize import check_request, float_model_for, quantize_model
from deepseek_tf.compress.run_io import (
    check_out_dir,
    count_parameters,
    load_source,
    progress,
    weight_bytes,
    with_model,
    write_run,
)
from deepseek_tf.data.pipeline import make_eval_dataset
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import build_model
from deepseek_tf.rundir import RunDir

INCLUDE = ("attention", "ffn")


def qat_model_from(model, config):
    """The fake-quant twin of `model` (same weights)."""
    qat_config = with_model(config, fake_quant=True)
    qat = build_model(qat_config, model.vocab_size)
    qat.set_weights(model.get_weights())
    return qat_config, qat


def convert_to_int8(qat, config):
    """The float architecture with `qat`'s weights, quantized to int8 by Keras (in the
    quantization precision, see `quantize.quantization_precision`)."""
    float_config, float_model = float_model_for(config, qat, fake_quant=False)
    quantize_model(float_model, config.model, "int8", include=INCLUDE, bits=8, group_size=-1)
    return with_model(float_config, quantize="int8"), float_model


def quantization_aware_finetune(model, config, tokenizer, *, steps, learning_rate, log=print):
    """Returns `(int8_config, int8_model, qat_model)` after `steps` of QAT fine-tuning."""
    qat_config, qat = qat_model_from(model, config)
    finetune(qat, qat_config, tokenizer, steps=steps, learning_rate=learning_rate, log=log)
    int8_config, int8_model = convert_to_int8(qat, config)
    return int8_config, int8_model, qat


def run(args) -> dict:
    if args.steps < 1:
        raise CompressionError(f"--steps: QAT needs at least one training step, got {args.steps}")
    out = check_out_dir(args.run_dir, args.out)
    check_request(RunDir(args.run_dir).read_config().model, "int8", INCLUDE, 8, -1)
    config, model, tokenizer = load_source(args.run_dir)
    log = None if args.quiet else progress
    eval_batches = config.train.eval_batches
    parameters, size = count_parameters(model), weight_bytes(model)
    loss_float = validation_loss(model, config, tokenizer, eval_batches)
    started = time.perf_counter()
    int8_config, int8_model, qat = quantization_aware_finetune(
        model, config, tokenizer, steps=args.steps, learning_rate=args.learning_rate, log=log
    )
    seconds = time.perf_counter() - started
    ids = np.asarray(next(iter(_probe(config, tokenizer))), np.int32)
    diff = float(np.max(np.abs(np.asarray(qat(ids)) - np.asarray(int8_model(ids)))))
    record = {
        "method": "qat",
        "options": {"steps": args.steps, "learning_rate": args.learning_rate, "mode": "int8"},
        "parameters_before": parameters,
        "val_loss_before": loss_float,
        "val_loss_after": validation_loss(int8_model, int8_config, tokenizer, eval_batches),
        "max_abs_logit_diff_qat_vs_int8": diff,
        "bytes_before": size,
        "bytes_after": weight_bytes(int8_model),
        "seconds": round(seconds, 3),
    }
    write_run(out, int8_config, tokenizer, int8_model, args.run_dir, record)
    return record


def _probe(config, tokenizer):
    """A few validation sequences to compare the QAT and converted models on."""
    ds = make_eval_dataset(config.data, tokenizer, 4, split="val")
    return (inputs for inputs, _, _ in ds.take(1))
