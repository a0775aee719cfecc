"""Hugging Face DeepSeek-V2/V3 checkpoints <-> deepseek-tf run directories."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from deepseek_tf.api import load
from deepseek_tf.convert.hf_config import (
    HF_CONFIG_FILE,
    config_from_hf,
    fp8_block_size,
    hf_config_from,
    read_hf_config,
)
from deepseek_tf.convert.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointReader,
    ConversionError,
    write_checkpoint,
)
from deepseek_tf.convert.weight_map import (
    IGNORABLE,
    mtp_prefix,
    shared_copies,
    weight_entries,
)
from deepseek_tf.errors import ConfigError, RunDirError
from deepseek_tf.models.builder import build_model
from deepseek_tf.rundir import HF_SOURCE_CONFIG, RunDir
from deepseek_tf.tokenizers import BPE_FILE, BPETokenizer

TOKENIZER_FILE = BPE_FILE  # Hugging Face's tokenizer.json
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
FLOAT32_ONLY = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # as transformers keeps


@dataclass(frozen=True)
class ConversionSummary:
    """What a conversion wrote.

    Attributes:
        directory: the run directory or Hugging Face model directory written.
        kind: `"run"` (from Hugging Face) or `"hf"` (to Hugging Face).
        n_tensors: Hugging Face tensors read or written.
        tokenizer: whether a `tokenizer.json` was carried over.
        mtp_depth: MTP modules converted.
    """

    directory: Path
    kind: str
    n_tensors: int
    tokenizer: bool
    mtp_depth: int

    def describe(self) -> str:
        """One line for the command line."""
        tok = TOKENIZER_FILE
        if not self.tokenizer:
            tok = "no tokenizer"
            if self.kind == "run":
                tok += f": the source has no {TOKENIZER_FILE}, so the run takes token ids"
        mtp = f", {self.mtp_depth} MTP module(s)" if self.mtp_depth else ""
        return f"wrote {self.directory} ({self.n_tensors} tensors{mtp}, {tok})"


def _check_tensors(reader: CheckpointReader, entries, ignorable: set[str]) -> None:
    """Every expected tensor present with its shape, and nothing unexplained besides."""
    expected = set()
    for entry in entries:
        for name in entry.names:
            expected.add(name)
            if name not in reader:
                raise ConversionError(f"{name}: missing")
            if reader.shape(name) != entry.hf_shape:
                raise ConversionError(
                    f"{name}: shape {reader.shape(name)}, expected {entry.hf_shape}"
                )
    extra = [
        k
        for k in reader.names()
        if k not in expected and k not in ignorable and not IGNORABLE.search(k)
    ]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(f"{extra[0]}: unexpected tensor for this config{more}")


def _has_mtp_tensors(reader: CheckpointReader, n_layers: int) -> bool:
    prefix = mtp_prefix(n_layers, 0)
    return any(k.startswith(prefix) for k in reader.names())


def _load_source_tokenizer(hf_dir: Path, vocab_size: int):
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


def convert_from_hf(hf_dir: str | Path, run_dir: str | Path) -> ConversionSummary:
    """Converts a Hugging Face DeepSeek-V2/V3 checkpoint into a deepseek-tf run directory.

    Reads `config.json` and `model.safetensors` (or a sharded index; BF16, F16,
    F32 or block-FP8 weights), builds the float32 model, checks that every
    expected tensor is present with its shape and that no unknown tensor is
    left, assigns the weights and writes `config.yaml`, a checkpoint (step 0),
    `hf_config.json` (the source config) and, when the source has one,
    `tokenizer.json`. Without it the run has no tokenizer and takes token ids.
    MTP modules are converted when `num_nextn_predict_layers > 0` and the
    checkpoint carries them (layer `num_hidden_layers`); checkpoints saved by
    transformers carry none, and then `mtp_depth` becomes 0.

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
    hf = read_hf_config(hf_dir)
    config = config_from_hf(hf)
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method", "fp8") if isinstance(quant, dict) else quant
    if method != "fp8":
        raise ConfigError(
            f"{HF_CONFIG_FILE}: quantization_config.quant_method {method!r} is not supported (fp8)"
        )
    reader = CheckpointReader(hf_dir, fp8_block_size(hf))
    m = config.model
    if m.mtp_depth and not _has_mtp_tensors(reader, m.n_layers):
        config = dataclasses.replace(config, model=dataclasses.replace(m, mtp_depth=0))
    tokenizer = _load_source_tokenizer(hf_dir, config.model.vocab_size)

    model = build_model(config)
    entries = weight_entries(model)
    _check_tensors(reader, entries, set(shared_copies(model)))
    for entry in entries:
        value = entry.to_keras([reader.get(name) for name in entry.names])
        entry.variable.assign(value.astype(entry.variable.dtype))

    run.path.mkdir(parents=True, exist_ok=True)
    run.checkpoint(model).save(0)
    run.copy_in(hf_dir / HF_CONFIG_FILE, HF_SOURCE_CONFIG)
    if tokenizer is not None:
        run.copy_in(hf_dir / TOKENIZER_FILE, TOKENIZER_FILE)
    run.write_config(config)  # last: a run directory is complete once it has its config
    n_tensors = sum(len(e.names) for e in entries)
    has_tokenizer = tokenizer is not None
    return ConversionSummary(run.path, "run", n_tensors, has_tokenizer, config.model.mtp_depth)


def _export_tensors(model, dtype) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for entry in weight_entries(model):
        for name, value in entry.to_hf(np.asarray(entry.variable.numpy())).items():
            keep32 = name.endswith(FLOAT32_ONLY)
            tensors[name] = value.astype(np.float32 if keep32 else dtype)
    for name, source in shared_copies(model).items():
        if ".layers." in name:  # MTP copies; a tied lm_head is not written (as transformers)
            tensors[name] = tensors[source]
    return tensors


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
) -> ConversionSummary:
    """Writes a run's latest weights as a Hugging Face DeepSeek-V3 (or V2) model directory.

    `config.json`, `model.safetensors` (sharded above `max_shard_bytes`, with
    `model.safetensors.index.json`) and, for a BPE run, `tokenizer.json`; the
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

    Raises:
        ConfigError: the model has no DeepSeek equivalent (the message names
            the config key), or `dtype` is unknown.
    """
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = RunDir(run_dir).read_config()
    hf_config_from(config)  # fail on unexportable models before loading any weights
    model, tokenizer = load(run_dir)
    hf = {**hf_config_from(config, model.vocab_size), **_token_ids(run_dir, tokenizer)}
    hf["dtype"] = dtype
    tensors = _export_tensors(model, EXPORT_DTYPES[dtype])
    write_checkpoint(tensors, out_dir, max_shard_bytes)
    (out_dir / HF_CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    has_bpe = (run_dir / TOKENIZER_FILE).is_file() and getattr(tokenizer, "kind", "") == "bpe"
    if has_bpe:
        shutil.copyfile(run_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    return ConversionSummary(out_dir, "hf", len(tensors), has_bpe, config.model.mtp_depth)
