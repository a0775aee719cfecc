"""Converting between Hugging Face DeepSeek-V2/V3 checkpoints and run directories:
`convert_from_hf` and `convert_to_hf`.

`deepseek-tf convert --from-hf HF_DIR --out RUN_DIR` and `deepseek-tf convert --to-hf
RUN_DIR --out HF_DIR` call these (`--from-hf` -> `hf_dir`, `--to-hf` -> `run_dir`); each
returns a `ConversionSummary` whose `describe()` is the line the command prints.

Examples:

>>> from deepseek_tf.api.conversion import convert_from_hf, convert_to_hf  # doctest: +SKIP
>>> convert_from_hf("hf/DeepSeek-V2-Lite", out="runs/v2-lite").describe()   # doctest: +SKIP
'wrote runs/v2-lite (...)'
>>> convert_from_hf("hf/DeepSeek-V2-Lite", out="runs/v2-lite-int4", quantize="int4",
...                 group_size=128)  # doctest: +SKIP
>>> convert_to_hf("runs/v2-lite", out="hf/back", max_shard_size="2GB")  # doctest: +SKIP
"""

from __future__ import annotations

import math

from deepseek_tf.convert import ConversionSummary
from deepseek_tf.convert import convert_from_hf as read_hf_checkpoint
from deepseek_tf.convert import convert_to_hf as write_hf_checkpoint
from deepseek_tf.errors import ConfigError

__all__ = ["convert_from_hf", "convert_to_hf", "parse_size"]

UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: str | int) -> int:
    """`"5GB"` -> bytes (decimal units as Hugging Face's `max_shard_size`; KiB/MiB/GiB and
    plain byte counts too).

    Raises:
        ConfigError: not a positive size.

    Examples:

    >>> parse_size("5GB"), parse_size("500MiB"), parse_size(4096)
    (5000000000, 524288000, 4096)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        number, unit = float(size), "B"
    else:
        raw = str(size).strip().upper()
        unit = next((u for u in sorted(UNITS, key=len, reverse=True) if raw.endswith(u)), "")
        text = raw[: len(raw) - len(unit)].strip()
        unit = unit or "B"
        try:
            number = float(text)
        except ValueError:
            number = 0.0
    count = int(number * UNITS[unit]) if math.isfinite(number) else 0
    if count <= 0:
        raise ConfigError(f"--max-shard-size: {size!r} is not a size such as 5GB or 500MB")
    return count


def convert_from_hf(
    hf_dir, *, out, dtype: str | None = None, quantize: str | None = None, group_size: int = -1
) -> ConversionSummary:
    """Converts a Hugging Face DeepSeek-V2/V3 checkpoint into a new run directory.

    Args:
        hf_dir: the Hugging Face model directory (`config.json`, safetensors, optionally
            `tokenizer.json`).
        out: the run directory to write (it must not hold a run).
        dtype: "float32" or "bfloat16": the run's weights and precision (None: the
            checkpoint's, bfloat16 for BF16 and FP8 checkpoints).
        quantize: None, or "int8" / "int4": store every projection (attention, dense
            FFN, shared and routed experts, an untied output head) as weight-only codes,
            quantized tensor by tensor as the checkpoint is read, so the float model is
            never held whole (what `compress quantize` would make of the float run).
        group_size: with `quantize`, inputs per scale (-1: one scale per output channel);
            it must divide the routed experts' input widths.

    Returns:
        The `ConversionSummary` (`directory`, `kind="run"`, `n_tensors`, `tokenizer`,
        `mtp_depth`, `quantize`; `describe()`).

    Raises:
        ConfigError: `config.json` missing, malformed or not DeepSeek; an unknown dtype
            or quantize mode.
        CompressionError: a `group_size` the experts' widths do not divide.
        ConversionError: a tensor missing, mis-shaped or unexpected (named).
        RunDirError: `out` already holds a run.
    """
    if quantize is None and group_size != -1:
        raise ConfigError("--group-size applies to --quantize only")
    return read_hf_checkpoint(hf_dir, out, dtype=dtype, quantize=quantize, group_size=group_size)


def convert_to_hf(
    run_dir,
    *,
    out,
    dtype: str | None = "float32",
    adapter_only: bool = False,
    max_shard_size: str | int = "5GB",
) -> ConversionSummary:
    """Writes a run's latest weights as a Hugging Face DeepSeek-V3 (or V2) model directory
    that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Args:
        run_dir: the run.
        out: the Hugging Face directory to write.
        dtype: the safetensors dtype, "float32" or "bfloat16" (None: float32).
        adapter_only: a LoRA run's adapters alone in PEFT's layout
            (`adapter_config.json` + `adapter_model.safetensors`) instead of the merged
            model.
        max_shard_size: largest safetensors shard, e.g. "5GB", "500MB", or bytes.

    Returns:
        The `ConversionSummary` (`kind="hf"`, or `"adapter"` with `adapter_only`).

    Raises:
        ConfigError: a model without a DeepSeek equivalent (the key named), an unknown
            dtype, a `max_shard_size` that is not a size.
    """
    max_shard_bytes = parse_size(max_shard_size)
    return write_hf_checkpoint(
        run_dir, out, dtype or "float32", max_shard_bytes=max_shard_bytes, adapter_only=adapter_only
    )
