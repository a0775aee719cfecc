"""Export a trained run: SavedModel (TF Serving / saved_model_cli), LiteRT, ONNX, GGUF.

Each exporter writes its artefact, reloads it with the target runtime, and
reports the max abs logit difference against the Keras model.

>>> from deepseek_tf.rundir import load_run                    # doctest: +SKIP
>>> model, tokenizer = load_run("runs/tiny")                  # doctest: +SKIP
>>> export(model, "out/sm", "savedmodel", tokenizer=tokenizer)  # doctest: +SKIP

(`deepseek_tf.api.deployment.export` does the same from a run directory.)
"""

from __future__ import annotations

from pathlib import Path

from deepseek_tf.errors import InputError
from deepseek_tf.export.gguf import QUANTS, export_gguf
from deepseek_tf.export.litert import export_litert
from deepseek_tf.export.onnx import export_onnx
from deepseek_tf.export.savedmodel import export_savedmodel

FORMATS = ("savedmodel", "litert", "onnx", "gguf")


def check_export_options(
    out,
    fmt: str,
    *,
    prefill_len: int | None = None,
    int8: bool = False,
    quant: str | None = None,
    overwrite: bool = False,
) -> None:
    """One-line `InputError`s for options `export` refuses (named as the command's flags):
    an existing `out` without `overwrite`, an unknown format or GGUF type, LiteRT-only or
    GGUF-only options with another format."""
    if Path(out).exists() and not overwrite:
        raise InputError(f"--out {out} already exists; pass --overwrite to replace it")
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if int8 and fmt != "litert":
        raise InputError("--int8 (dynamic-range weight quantisation) is only for --format litert")
    if prefill_len is not None and fmt != "litert":
        raise InputError("--prefill-len is only for --format litert")
    if quant is not None and fmt != "gguf":
        raise InputError("--quant is only for --format gguf (LiteRT quantises with --int8)")
    if quant is not None and quant not in QUANTS:
        raise InputError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")


def export(
    model,
    out,
    fmt: str,
    *,
    tokenizer=None,
    prefill_len: int | None = None,
    int8: bool = False,
    quant: str | None = None,
    config=None,
    verify: bool = True,
    overwrite: bool = False,
) -> dict:
    """Exports `model` to `out` in format `fmt`; returns the exporter's report dict.
    An existing `out` is refused unless `overwrite` (see `check_export_options`).
    GGUF needs the run's `config` (its hyperparameters) and takes `quant` (default bf16)."""
    check_export_options(
        out, fmt, prefill_len=prefill_len, int8=int8, quant=quant, overwrite=overwrite
    )
    if fmt == "gguf":
        if config is None:
            raise InputError("GGUF export needs the run's config")
        return export_gguf(model, config, out, tokenizer, quant=quant or "bf16", verify=verify)
    if fmt == "savedmodel":
        return export_savedmodel(model, out, tokenizer, verify=verify)
    if fmt == "litert":
        return export_litert(model, out, prefill_len=prefill_len, int8=int8, verify=verify)
    return export_onnx(model, out, verify=verify)
