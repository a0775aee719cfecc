"""Post-training quantisation with Keras' own quantizers (`compression.quantize`).

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
compute). A quantized run records `compression.quantize` (+ what it included, bits, group
size) in its config; `deepseek_tf.load` rebuilds the same quantized variables before
restoring them.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import keras
import numpy as np

from deepseek_tf.compress.job import (
    Plan,
    Result,
    check_choice,
    check_int,
    comma_list,
    run_job,
)
from deepseek_tf.compress.run_io import Log, Source
from deepseek_tf.config.loader import update_config
from deepseek_tf.data.pipeline import make_train_dataset
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import build_model
from deepseek_tf.models.quantization import frozen_heap, quantization_config

MODES = ("int8", "int4", "float8", "gptq", "awq")
CALIBRATED = ("gptq", "awq")  # modes that calibrate on training sequences
INCLUDE = ("attention", "ffn", "head", "experts")


def check_request(config, mode: str, include, bits: int, group_size: int) -> None:
    """Refuses requests the run (`config`) cannot take, before any work."""
    model_config, compression = config.model, config.compression
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
    if compression.quantize != "none":
        raise CompressionError(f"the run is already quantized ({compression.quantize})")
    if compression.fake_quant:
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
        with contextlib.redirect_stdout(sys.stderr), frozen_heap():
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
    return 128 if mode in CALIBRATED else -1


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
    float16 compute, so a `mixed_float16` run (`train.precision`, or `model.dtype` for
    loading it) is quantized (and served) in float32."""
    changes = {}
    if config.train.precision == "mixed_float16":
        changes["train"] = {"precision": "float32"}
    if config.model.dtype == "mixed_float16":
        changes["model"] = {"dtype": "float32"}
    return update_config(config, **changes) if changes else config


def float_model_for(config, model, **changes):
    """`(config, model)` rebuilt with `changes` to the `compression` section and the
    quantization precision, holding `model`'s weights (the same variables, in the same
    order)."""
    target = quantization_precision(update_config(config, compression=changes))
    rebuilt = build_model(target, model.vocab_size)
    rebuilt.set_weights(model.get_weights())
    return target, rebuilt


def quantize(
    run_dir,
    *,
    out,
    mode: str,
    bits: int = 4,
    group_size: int | None = None,
    calibration_samples: int = 128,
    include: str | tuple[str, ...] | None = None,
    quiet: bool = False,
) -> dict:
    """Post-training quantisation of a trained run into a new run
    (`deepseek-tf compress quantize`).

    Args:
        run_dir: the trained run.
        out: the new run directory.
        mode: "int8", "int4", "float8", "gptq" or "awq".
        bits: GPTQ: 2, 3, 4 or 8; AWQ: 4 (int8/int4/float8 ignore it).
        group_size: inputs per scale for int4/gptq/awq, -1 one per output channel
            (None: int4 -1, gptq/awq 128).
        calibration_samples: training sequences GPTQ/AWQ calibrate on.
        include: what to quantize, a comma list or a sequence of "attention", "ffn",
            "head", "experts" (None: attention and ffn, plus the routed experts of an
            MoE run under int8/int4).
        quiet: no progress lines.

    Returns:
        The record (`compress.job`), with `options` {mode, bits, group_size, include,
        calibration_samples (0 unless calibrated)}.

    Raises:
        CompressionError: an option or a combination the run cannot take (before any work).

    Examples:
        >>> from deepseek_tf import compress
        >>> compress.quantize("runs/tiny", out="runs/tiny-int8", mode="int8")  # doctest: +SKIP
    """
    check_choice("mode", mode, MODES)
    check_int("bits", bits)
    check_int("group_size", group_size, optional=True)
    check_int("calibration_samples", calibration_samples, minimum=1)
    group_size = default_group_size(mode, group_size)
    chosen = None if include is None else comma_list("include", include)

    def plan_for(config) -> Plan:
        parts = default_include(config.model, mode) if chosen is None else chosen
        check_request(config, mode, parts, bits, group_size)
        options = {"mode": mode, "bits": bits, "group_size": group_size, "include": list(parts)}
        options["calibration_samples"] = calibration_samples if mode in CALIBRATED else 0
        return Plan(
            "quantize",
            options,
            transform=functools.partial(
                _quantized,
                mode=mode,
                include=parts,
                bits=bits,
                group_size=group_size,
                samples=options["calibration_samples"],
            ),
            check_loaded=lambda source: check_group_size(source.model, mode, parts, group_size),
        )

    return run_job(run_dir, out, plan_for, quiet=quiet)


def _quantized(source: Source, log: Log, *, mode, include, bits, group_size, samples) -> Result:
    """The quantized config and model of `source` (the job's transform)."""
    config, model = source.config, source.model
    dataset = calibration_tokens(config, source.tokenizer, samples) if samples else None
    log(f"[quantize] {mode} on {', '.join(include)}")
    if quantization_precision(config) != config:
        config, model = float_model_for(config, model)
    quantize_model(
        model,
        config.model,
        mode,
        include=include,
        bits=bits,
        group_size=group_size,
        dataset=dataset,
    )
    config = update_config(
        config,
        compression={
            "quantize": mode,
            "quantize_include": include,
            "quantize_bits": bits,
            "quantize_group_size": group_size,
        },
    )
    return Result(config, model)
