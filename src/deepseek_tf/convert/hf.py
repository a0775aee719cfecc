"""Hugging Face DeepSeek-V2/V3 checkpoints <-> deepseek-tf run directories."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from deepseek_tf.config.loader import update_config
from deepseek_tf.convert.hf_config import (
    HF_CONFIG_FILE,
    config_from_hf,
    fp8_block_size,
    hf_config_from,
    read_hf_config,
)
from deepseek_tf.convert.hf_weights import NUMPY_DTYPES, assign_hf_weights
from deepseek_tf.convert.peft_adapter import adapter_tensors, save_peft_adapter
from deepseek_tf.convert.quantized_weights import (
    assign_quantized_weights,
    expert_build_config,
    quantized_config,
)
from deepseek_tf.convert.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointReader,
    ConversionError,
)
from deepseek_tf.convert.safetensors_writer import TensorSpec, stream_checkpoint
from deepseek_tf.convert.weight_map import mtp_prefix, shared_copies, weight_entries
from deepseek_tf.errors import ConfigError, RunDirError
from deepseek_tf.layers.deferred_init import initializers_skipped
from deepseek_tf.models.builder import build_model
from deepseek_tf.models.footprint import check_fits
from deepseek_tf.models.lora import merge_lora
from deepseek_tf.rundir import HF_SOURCE_CONFIG, RunDir
from deepseek_tf.tokenizers import BPE_FILE, BPETokenizer
from deepseek_tf.tokenizers.tokenizer_settings import SETTINGS_FILES

TOKENIZER_FILE = BPE_FILE  # Hugging Face's tokenizer.json
# with tokenizer_config.json and the chat template files transformers 4.4x/5 write
TOKENIZER_FILES = (TOKENIZER_FILE, *SETTINGS_FILES)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
EXPORT_DTYPES = NUMPY_DTYPES  # the dtypes a run's weights and an export can have
FLOAT32_ONLY = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # as transformers keeps


@dataclass(frozen=True)
class ConversionSummary:
    """What a conversion wrote.

    Attributes:
        directory: the run directory or Hugging Face model directory written.
        kind: `"run"` (from Hugging Face), `"hf"` (to Hugging Face) or `"adapter"`
            (a PEFT adapter).
        n_tensors: Hugging Face tensors read or written.
        tokenizer: whether a `tokenizer.json` was carried over.
        mtp_depth: MTP modules converted.
        quantize: `"none"`, or the weight-only codes the run stores (`"int8"`, `"int4"`).
    """

    directory: Path
    kind: str
    n_tensors: int
    tokenizer: bool
    mtp_depth: int
    quantize: str = "none"

    def describe(self) -> str:
        """One line for the command line."""
        tok = TOKENIZER_FILE
        if not self.tokenizer:
            tok = "no tokenizer"
            if self.kind == "run":
                tok += f": the source has no {TOKENIZER_FILE}, so the run takes token ids"
        if self.kind == "adapter":
            return f"wrote {self.directory} (a PEFT LoRA adapter: {self.n_tensors} tensors)"
        mtp = f", {self.mtp_depth} MTP module(s)" if self.mtp_depth else ""
        quant = f", {self.quantize} weights" if self.quantize != "none" else ""
        return f"wrote {self.directory} ({self.n_tensors} tensors{mtp}{quant}, {tok})"


def _has_mtp_tensors(reader: CheckpointReader, n_layers: int) -> bool:
    prefix = mtp_prefix(n_layers, 0)
    return any(k.startswith(prefix) for k in reader.names())


def load_source_tokenizer(hf_dir: Path, vocab_size: int):
    """The checkpoint's `tokenizer.json` (+ `tokenizer_config.json`), or None; one
    whose vocabulary exceeds the embedding's `vocab_size` rows is refused."""
    path = hf_dir / TOKENIZER_FILE
    if not path.is_file():
        return None
    tokenizer = BPETokenizer.load(str(path))
    if tokenizer.vocab_size > vocab_size:
        raise ConversionError(
            f"{TOKENIZER_FILE}: {tokenizer.vocab_size} tokens exceed the model's "
            f"vocab_size {vocab_size}"
        )
    return tokenizer


def convert_from_hf(
    hf_dir: str | Path,
    run_dir: str | Path,
    dtype: str | None = None,
    quantize: str | None = None,
    group_size: int = -1,
) -> ConversionSummary:
    """Converts a Hugging Face DeepSeek-V2/V3 checkpoint into a deepseek-tf run directory.

    Reads `config.json` and `model.safetensors` (or a sharded index; BF16, F16,
    F32 or block-FP8 weights), builds the model in `dtype` (`"bfloat16"` or
    `"float32"`; default: the checkpoint's, bfloat16 for BF16 and FP8 weights;
    it becomes the run's `train.precision`, and its `model.dtype` -- `"auto"` for a
    bfloat16 default: see `models.builder.inference_dtype`), checks that every expected tensor
    is present with its shape and that no unknown tensor is left, assigns the
    weights one variable at a time (FP8 dequantised tensor by tensor; never a
    second copy of the model) and writes `config.yaml`, a checkpoint (step 0),
    `hf_config.json` (the source config) and, when the source has one,
    `tokenizer.json` with its `tokenizer_config.json` (special tokens,
    `add_bos_token`, the chat template). Without it the run has no tokenizer and takes token ids.
    MTP modules are converted when `num_nextn_predict_layers > 0` and the
    checkpoint carries them (layer `num_hidden_layers`); checkpoints saved by
    transformers carry none, and then `mtp_depth` becomes 0.

    With `quantize` (`"int8"` or `"int4"`, `group_size` inputs per scale, -1: one per
    output channel) every projection is stored as weight-only codes, quantized as it is
    read (`convert.quantized_weights`): the float model is never held whole.

    Raises:
        ConfigError: `config.json` is missing, malformed or not DeepSeek.
        ConversionError: a tensor is missing, mis-shaped or unexpected
            (the message names it).
        RunDirError: `run_dir` already holds a run.
    """
    hf_dir, run = Path(hf_dir), RunDir(run_dir)
    if run.exists() or run.checkpoint_dir.exists():
        raise RunDirError(f"{run.path}: already a run directory; choose a new --out")
    run.check_new()
    if dtype not in (None, *EXPORT_DTYPES):
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    hf = read_hf_config(hf_dir)
    config_from_hf(hf)  # a malformed config.json fails before any tensor is read
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method", "fp8") if isinstance(quant, dict) else quant
    if method != "fp8":
        raise ConfigError(
            f"{HF_CONFIG_FILE}: quantization_config.quant_method {method!r} is not supported (fp8)"
        )
    reader = CheckpointReader(hf_dir, fp8_block_size(hf))
    chosen, dtype = dtype, dtype or reader.storage_dtype()
    config = config_from_hf(hf, precision=dtype)
    if chosen is None and dtype == "bfloat16":  # as stored; run in what computes fastest
        config = update_config(config, model={"dtype": "auto"})
    m = config.model
    if m.mtp_depth and not _has_mtp_tensors(reader, m.n_layers):
        config = update_config(config, model={"mtp_depth": 0})
    built = config
    if quantize is not None:  # refused before any tensor is read
        config = quantized_config(config, quantize, group_size)
        built = expert_build_config(config)  # the experts as codes from the start
    check_fits(config, purpose="inference")
    tokenizer = load_source_tokenizer(hf_dir, config.model.vocab_size)

    with initializers_skipped() as skipped:  # no random weights: the checkpoint's replace them
        model = build_model(built, dtype=dtype)  # the run's weights: as stored or --dtype
    if quantize is None:
        n_tensors = assign_hf_weights(model, reader)
        skipped.run_except(model, [entry.variable for entry in weight_entries(model)])
    else:  # the projections' float variables are replaced by codes as it goes
        n_tensors, kept = assign_quantized_weights(model, reader, config.compression)
        skipped.run_except(model, kept)

    run.path.mkdir(parents=True, exist_ok=True)
    run.checkpoint(model).save(0)
    run.copy_in(hf_dir / HF_CONFIG_FILE, HF_SOURCE_CONFIG)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:  # special tokens, the chat template (in its own file)
            if (hf_dir / name).is_file():
                run.copy_in(hf_dir / name, name)
    run.write_config(config)  # last: a run directory is complete once it has its config
    has_tokenizer = tokenizer is not None
    return ConversionSummary(
        run.path,
        "run",
        n_tensors,
        has_tokenizer,
        config.model.mtp_depth,
        config.compression.quantize,
    )


def _export_plan(model, dtype) -> tuple[list[TensorSpec], object]:
    """`(specs, chunks)` of a model's Hugging Face tensors for `stream_checkpoint`: one
    chunk per tensor, converted only when the writer asks for it (one variable read at a
    time), then the copies checkpoints repeat (MTP embeddings and heads)."""
    entries = weight_entries(model)
    by_name = {name: entry for entry in entries for name in entry.names}

    def dtype_of(name):
        return np.dtype(np.float32 if name.endswith(FLOAT32_ONLY) else dtype)

    copies = {n: src for n, src in shared_copies(model).items() if ".layers." in n}
    # a tied lm_head is not written (as transformers)
    specs = [
        TensorSpec(name, dtype_of(name), entry.hf_shape)
        for entry in entries
        for name in entry.names
    ]
    specs += [TensorSpec(n, dtype_of(src), by_name[src].hf_shape) for n, src in copies.items()]

    def tensors(entry, names=None):
        """`(name, array)` of the entry's tensors, one array made at a time (C order, the
        export dtype: one copy at most)."""
        # the variable's buffer itself (`.numpy()` would copy it): read, never written
        views = entry.to_hf(np.asarray(tf.convert_to_tensor(entry.variable)))
        for name in names or entry.names:
            yield name, np.asarray(views.pop(name), dtype=dtype_of(name), order="C")

    def chunks():
        for entry in entries:
            for name, value in tensors(entry):
                yield {name: value}
                del value  # not held while the next one is made
        for name, source in copies.items():
            for _, value in tensors(by_name[source], [source]):
                yield {name: value}
                del value

    return specs, chunks()


def _base_model(run_dir: Path) -> str | None:
    """The directory a fine-tuned run started from (its history's `init_from`), if any."""
    for entry in RunDir(run_dir).read_history():
        if isinstance(entry, dict) and entry.get("method") == "init_from":
            return entry.get("source")
    return None


def _token_ids(run_dir: Path, tokenizer) -> dict:
    """bos/eos/pad ids: the source checkpoint's when converted from one, else the tokenizer's."""
    source = run_dir / HF_SOURCE_CONFIG
    if source.is_file():
        try:
            hf = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            hf = {}
        if isinstance(hf, dict):
            return {k: hf[k] for k in TOKEN_ID_KEYS if k in hf}
    eos = tokenizer.eos_id if tokenizer is not None else None
    return {"eos_token_id": eos} if eos is not None else {}


def convert_to_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    adapter_only: bool = False,
) -> ConversionSummary:
    """Writes a run's latest weights as a Hugging Face DeepSeek-V3 (or V2) model directory.

    `config.json`, `model.safetensors` (sharded above `max_shard_bytes`, with
    `model.safetensors.index.json`) and, for a BPE run, `tokenizer.json` and
    `tokenizer_config.json`; the
    result loads with `transformers.AutoModelForCausalLM.from_pretrained`.
    Sigmoid-routed (and dense) models become `deepseek_v3`, softmax-routed ones
    `deepseek_v2`. MTP modules are written as decoder layers
    `num_hidden_layers + k`, as DeepSeek-V3 publishes them (transformers
    itself does not load them into `DeepseekV3ForCausalLM`).

    Args:
        run_dir: a deepseek-tf run directory.
        out_dir: the output directory (created; earlier model files replaced).
        dtype: `"float32"` or `"bfloat16"`; the router stays float32, as in
            transformers.
        max_shard_bytes: largest safetensors shard.
        adapter_only: write the run's LoRA adapters alone, in PEFT's layout
            (`adapter_config.json` + `adapter_model.safetensors`), instead of the
            merged model.

    Raises:
        ConfigError: the model has no DeepSeek equivalent (the message names
            the config key), or `dtype` is unknown.
    """
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = RunDir(run_dir).read_config()
    hf_config_from(config)  # fail on unexportable models before loading any weights
    check_fits(config, purpose="inference")
    model, tokenizer = RunDir(run_dir).load(config)
    if adapter_only:
        save_peft_adapter(model, config, out_dir, _base_model(run_dir))
        return ConversionSummary(out_dir, "adapter", len(adapter_tensors(model)), False, 0)
    if config.train.lora_rank:  # the adapters become part of the plain weights
        merge_lora(model)
    hf = {**hf_config_from(config, model.vocab_size), **_token_ids(run_dir, tokenizer)}
    hf["dtype"] = dtype
    specs, chunks = _export_plan(model, EXPORT_DTYPES[dtype])
    stream_checkpoint(specs, chunks, out_dir, max_shard_bytes)
    (out_dir / HF_CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    has_bpe = (  # a char tokenizer has no file transformers can read
        tokenizer is not None
        and tokenizer.hugging_face_format
        and (run_dir / TOKENIZER_FILE).is_file()
    )
    if has_bpe:
        for name in TOKENIZER_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, out_dir / name)
    return ConversionSummary(out_dir, "hf", len(specs), has_bpe, config.model.mtp_depth)
