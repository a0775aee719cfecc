"""Post-training quantisation with Keras' own quantizers (`model.quantize`).

int8 / int4 / float8 quantize every selected `Dense` from its weights alone; GPTQ
and AWQ calibrate on training sequences from the run's data pipeline, block by
block, with the layer structure Keras asks for (`pre_block_layers`: the embedding;
`sequential_blocks`: the decoder blocks). What can be quantized: the attention and
dense-FFN projections (and shared experts), optionally the untied output head, and
with int8/int4 the routed experts. Those are stacked weights, not `Dense` layers, so
no Keras quantizer reaches them: `DeepSeekMoE.quantize_experts` stores them as
weight-only codes with Keras' primitives (`layers/expert_quant.py`), on by default
for MoE runs. GPTQ/AWQ calibrate `Dense` layers only: asking them for experts is an
error (quantize experts with int8/int4 instead); QAT (`fake_quant`) covers the
shared experts, not the routed ones. MLA's `kv_b_proj` stays float: absorbed
decoding folds its float kernel into the query and output.

A `mixed_float16` run is quantized into a float32 run (Keras' int8 layers refuse float16
compute). A quantized run records `model.quantize` (+ what it included, bits, group
size) in its config; `deepseek_tf.load` rebuilds the same quantized variables before
restoring them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import keras
import numpy as np

from deepseek_tf.compress.finetune import validation_loss
from deepseek_tf.compress.run_io import (
    check_out_dir,
    count_parameters,
    load_source,
    progress,
    weight_bytes,
    with_model,
    write_run,
)
from deepseek_tf.data.pipeline import make_train_dataset
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import build_model
from deepseek_tf.models.quantization import quantization_config
from deepseek_tf.rundir import RunDir

INCLUDE = ("attention", "ffn", "head", "experts")


def check_request(model_config, mode: str, include, bits: int, group_size: int) -> None:
    """Refuses requests the model cannot take, before any work."""
    unknown = set(include) - set(INCLUDE)
    if unknown:
        raise CompressionError(f"--include: unknown {sorted(unknown)}; choose from {INCLUDE}")
    if "experts" in include:
        if not model_config.n_routed_experts:
            raise CompressionError("--include experts: the model has no routed experts")
        if mode not in ("int8", "int4"):
            raise CompressionError(
                f"--include experts: routed experts are quantized by int8 or int4 (weight-"
                f"only codes); {mode} reaches Dense layers only"
            )
        widths = (model_config.d_model, model_config.moe_ffn_dim)
        if group_size > 0 and any(w % group_size for w in widths):
            raise CompressionError(
                f"--group-size {group_size}: must divide the experts' input widths {widths}"
            )
    if "head" in include and model_config.tie_embeddings:
        raise CompressionError(
            "--include head: the output head is the tied embedding matrix (an Embedding, "
            "read in float by the head); quantize an untied model's head only"
        )
    if model_config.quantize != "none":
        raise CompressionError(f"the run is already quantized ({model_config.quantize})")
    if model_config.fake_quant:
        raise CompressionError("the run is a QAT model; `compress qat` converts it to int8")
    if mode == "awq" and bits != 4:
        raise CompressionError(f"--bits: AWQ supports 4-bit weights only, got {bits}")
    if mode == "gptq" and bits not in (2, 3, 4, 8):
        raise CompressionError(f"--bits: GPTQ takes 2, 3, 4 or 8, got {bits}")
    if group_size == 0 or group_size < -1:
        raise CompressionError(f"--group-size: -1 (per channel) or positive, got {group_size}")
    if mode == "float8" and keras.config.backend() != "tensorflow":
        raise CompressionError("--mode float8 needs the TensorFlow backend")


class _Embed(keras.layers.Layer):
    """GPTQ/AWQ `pre_block_layers` entry: token ids -> the model's scaled embeddings."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, token_ids):
        return self.model.embed(token_ids, training=False)  # (B, T, C)


class _Block(keras.layers.Layer):
    """GPTQ/AWQ `sequential_blocks` entry: a decoder block returning its hidden states."""

    def __init__(self, block, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def call(self, x):
        return self.block(x)["x"]  # (B, T, C)


def layer_structure(model) -> dict:
    """The topology Keras' GPTQ/AWQ walk: embedding first, then each decoder block."""
    return {
        "pre_block_layers": [_Embed(model)],
        "sequential_blocks": [_Block(b) for b in model.blocks],
    }


def calibration_tokens(config, tokenizer, samples: int) -> np.ndarray:
    """`(samples, seq_len)` int32 training sequences from the run's data pipeline."""
    ds = make_train_dataset(config.data, tokenizer, samples)
    inputs, _, _ = next(iter(ds))
    return np.asarray(inputs, np.int32)


def default_include(model_config, mode: str) -> tuple[str, ...]:
    """attention and ffn, plus the routed experts of an MoE run under int8/int4."""
    experts = bool(model_config.n_routed_experts) and mode in ("int8", "int4")
    return ("attention", "ffn", "experts") if experts else ("attention", "ffn")


def quantize_model(model, model_config, mode, *, include, bits, group_size, dataset=None):
    """Quantizes `model` in place with Keras (`dataset`: calibration ids for gptq/awq).

    The layers quantized are those the model declares quantizable for `include`
    (`CausalLM.quantizable_layers`), and with `"experts"` every `DeepSeekMoE`'s
    routed experts (MTP modules' included).
    """
    if "experts" in include:
        for moe in model.moe_modules():
            moe.quantize_experts(mode, group_size)
    length = int(np.shape(dataset)[-1]) if dataset is not None else 0
    cfg = quantization_config(mode, bits, group_size, dataset, sequence_length=length)
    if cfg is not None and mode in ("gptq", "awq"):
        cfg.quantization_layer_structure = layer_structure(model)
    hooked = model.quantizable_layers(include)
    chosen = {id(layer) for layer in hooked}
    if not chosen:
        return

    def selected(layer) -> bool:
        return id(layer) in chosen

    if mode in ("gptq", "awq"):
        for layer in hooked:
            _route_calibration_calls(layer, mode)
    try:
        # Keras' GPTQ/AWQ draw a progress bar on stdout: keep stdout for the JSON record.
        with contextlib.redirect_stdout(sys.stderr):
            model.quantize(mode, config=cfg, filters=selected)
    finally:
        for layer in hooked:
            layer.__dict__.pop("quantized_call", None)


def _route_calibration_calls(layer, mode: str) -> None:
    """Works around Keras 3.15: GPTQ/AWQ collect activations by patching `layer.call`,
    but a layer in a quantized mode is run through `quantized_call`, so the hook never
    fires, the Hessian stays zero and GPTQ degrades to round-to-nearest. Until a layer
    is calibrated, route `quantized_call` to `call` (its float path) so the hook sees
    the inputs; calibrated layers run their real quantized call."""
    quantized_call = type(layer).quantized_call

    def route(*args, **kwargs):
        if getattr(layer, f"is_{mode}_calibrated", False):
            return quantized_call(layer, *args, **kwargs)
        return layer.call(*args, **kwargs)

    layer.quantized_call = route


GPTQ_BLOCK = 128  # columns Keras' GPTQ processes at once


def default_group_size(mode: str, group_size: int | None) -> int:
    if group_size is not None:
        return group_size
    return 128 if mode in ("gptq", "awq") else -1


def check_group_size(model, mode: str, include, group_size: int) -> None:
    """Keras 3.15's GPTQ writes one scale per 128-input block even when asked for one per
    channel (group -1): it then fails on wider layers. Refuse that before calibrating."""
    if mode != "gptq" or group_size != -1:
        return
    for layer in model.quantizable_layers(include):
        if layer.kernel.shape[0] > GPTQ_BLOCK:
            raise CompressionError(
                f"--group-size -1: Keras' GPTQ supports per-channel scales only for layers of "
                f"at most {GPTQ_BLOCK} inputs ({layer.path} has {layer.kernel.shape[0]}); "
                "use --group-size 128"
            )


def quantization_precision(config):
    """`config` with the precision its quantized run computes in: Keras' int8 layers refuse
    float16 compute, so a `mixed_float16` run is quantized (and served) in float32."""
    if config.train.precision != "mixed_float16":
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, precision="float32"))


def float_model_for(config, model, **changes):
    """`(config, model)` rebuilt with `changes` to the model config and the quantization
    precision, holding `model`'s weights (the same variables, in the same order)."""
    target = quantization_precision(with_model(config, **changes))
    rebuilt = build_model(target, model.vocab_size)
    rebuilt.set_weights(model.get_weights())
    return target, rebuilt


def run(args) -> dict:
    source_model = RunDir(args.run_dir).read_config().model
    include = default_include(source_model, args.mode)
    if args.include is not None:
        include = tuple(x for x in args.include.split(",") if x)
    args.group_size = default_group_size(args.mode, args.group_size)
    out = check_out_dir(args.run_dir, args.out)
    check_request(source_model, args.mode, include, args.bits, args.group_size)
    config, model, tokenizer = load_source(args.run_dir)
    check_group_size(model, args.mode, include, args.group_size)
    log = (lambda *_: None) if args.quiet else progress

    before = {"parameters": count_parameters(model), "bytes": weight_bytes(model)}
    before["val_loss"] = validation_loss(model, config, tokenizer, config.train.eval_batches)
    started = time.perf_counter()
    dataset = None
    if args.mode in ("gptq", "awq"):
        dataset = calibration_tokens(config, tokenizer, args.calibration_samples)
    log(f"[quantize] {args.mode} on {', '.join(include)}")
    if quantization_precision(config) != config:
        config, model = float_model_for(config, model)
    quantize_model(
        model,
        config.model,
        args.mode,
        include=include,
        bits=args.bits,
        group_size=args.group_size,
        dataset=dataset,
    )
    seconds = time.perf_counter() - started
    config = with_model(
        config,
        quantize=args.mode,
        quantize_include=include,
        quantize_bits=args.bits,
        quantize_group_size=args.group_size,
    )
    after = validation_loss(model, config, tokenizer, config.train.eval_batches)
    record = {
        "method": "quantize",
        "options": {
            "mode": args.mode,
            "bits": args.bits,
            "group_size": args.group_size,
            "include": list(include),
            "calibration_samples": args.calibration_samples if dataset is not None else 0,
        },
        "parameters_before": before["parameters"],
        "val_loss_before": before["val_loss"],
        "val_loss_after": after,
        "seconds": round(seconds, 3),
    }
    record.update(bytes_before=before["bytes"], bytes_after=weight_bytes(model))
    write_run(out, config, tokenizer, model, args.run_dir, record)
    return record
