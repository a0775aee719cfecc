"""`train --init-from SOURCE`: fine-tune a run or a Hugging Face checkpoint.

The new run takes the source's model, compression and calibration sections and its
tokenizer, the train/data/runtime sections of `--config` (or the source's own), then
`--set` overrides; its `model.dtype` is reset to "" (a fine-tuned run is loaded in the
`train.precision` it trains in, unless `--set model.dtype=...`). It starts at
step 0 with a fresh optimizer. The weights come from the source's newest
checkpoint (a run) or its safetensors (a Hugging Face directory, assigned tensor
by tensor in the run's precision); LoRA adapters (`train.lora_rank`) are added
after, so the base arrives exactly as it was and only the adapters train.

This module reads both kinds of source, so it sits with the conversion code, above
`rundir` and `training`: the trainer receives what it loads from its caller.
"""

from __future__ import annotations

from pathlib import Path

from deepseek_tf.config.loader import apply_overrides, config_to_dict, update_config
from deepseek_tf.config.schema import Config
from deepseek_tf.convert.hf import load_source_tokenizer
from deepseek_tf.convert.hf_config import (
    HF_CONFIG_FILE,
    config_from_hf,
    fp8_block_size,
    read_hf_config,
)
from deepseek_tf.convert.hf_weights import assign_hf_weights
from deepseek_tf.convert.safetensors_io import CheckpointReader
from deepseek_tf.errors import ConfigError, RunDirError
from deepseek_tf.rundir import CONFIG_FILE, RunDir

# What makes two models the same family: weights of one cannot initialise the other.
FAMILY_KEYS = ("attention", "d_model", "n_layers", "n_heads", "n_routed_experts")


def source_kind(source) -> str:
    """`"run"` (a deepseek-tf run directory) or `"hf"` (a Hugging Face model directory).

    Raises:
        RunDirError: `source` is neither.
    """
    path = Path(source)
    if (path / CONFIG_FILE).is_file():
        return "run"
    if (path / HF_CONFIG_FILE).is_file():
        return "hf"
    raise RunDirError(
        f"--init-from {source}: neither a run ({CONFIG_FILE}) nor a Hugging Face model "
        f"directory ({HF_CONFIG_FILE})"
    )


def source_config(source) -> tuple[Config, object]:
    """The source's own config and tokenizer (None when it has none)."""
    if source_kind(source) == "run":
        run = RunDir(source)
        return run.read_config(), run.read_tokenizer(required=False)
    hf = read_hf_config(Path(source))
    reader = CheckpointReader(source, fp8_block_size(hf))
    config = config_from_hf(hf, precision=reader.storage_dtype())
    return config, load_source_tokenizer(Path(source), config.model.vocab_size)


def init_config(source, base: Config | None = None, overrides=()) -> tuple[Config, object]:
    """`(config, tokenizer)` of a run fine-tuned from `source`.

    Args:
        source: a run directory or a Hugging Face model directory.
        base: the config whose train/data/runtime sections the new run takes (from
            `--config`/`--preset`); None keeps the source's own.
        overrides: `--set section.key=value` strings, applied last.

    Raises:
        ConfigError: `base` is another architecture family than the source (the
            message names the key), or the source has no tokenizer to read the
            training text with.
    """
    config, tokenizer = source_config(source)
    if tokenizer is None:
        raise ConfigError(
            f"--init-from {source}: the source has no tokenizer (tokenizer.json), so it "
            "cannot read training text"
        )
    if base is not None:
        for key in FAMILY_KEYS:
            theirs, ours = getattr(config.model, key), getattr(base.model, key)
            if theirs != ours:
                raise ConfigError(
                    f"--init-from {source}: model.{key} is {theirs!r} there but {ours!r} in "
                    "--config; fine-tuning keeps the source's architecture (drop --config or "
                    "choose one of its family)"
                )
        source = config_to_dict(config)
        config = update_config(
            base,
            model=source["model"],
            compression=source["compression"],
            calibration=source["calibration"],
            data={"tokenizer": config.data.tokenizer, "vocab_size": config.data.vocab_size},
            train={"precision": config.train.precision},
        )
    config = update_config(config, model={"dtype": ""})  # loaded in its train.precision
    return apply_overrides(config, list(overrides)), tokenizer


def load_initial_weights(model, source) -> str:
    """Assigns the source's weights to `model` (built without adapters).

    Args:
        model: the model of `init_config(source, ...)`'s config.
        source: a run directory or a Hugging Face model directory.

    Returns:
        A line saying what was loaded, e.g. `"runs/tiny (step 20)"`.

    Raises:
        RunDirError / ConversionError: the weights do not fit the model (named).
    """
    if source_kind(source) == "run":
        run = RunDir(source)  # the weights `eval`/`generate` of it use (the best, if kept)
        step = run.weights_checkpoint(model, run.read_config()).restore(weights_only=True)
        return f"{source} (step {step})"
    hf = read_hf_config(Path(source))
    n = assign_hf_weights(model, CheckpointReader(source, fp8_block_size(hf)))
    return f"{source} ({n} tensors)"
