"""`info`: a run's, preset's or config file's resolved config, parameter counts, and for
a run its training state and compression history (`deepseek-tf info`).

Examples:

>>> import deepseek_tf as ds                                           # doctest: +SKIP
>>> ds.info(preset="deepseek-v3")["parameters"]["total"]               # doctest: +SKIP
671026419200
>>> sorted(ds.info(presets=True)["presets"])[:2]                       # doctest: +SKIP
['deepseek-v2', 'deepseek-v2-lite']
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from deepseek_tf.api.training import resolve_config
from deepseek_tf.config.loader import (
    apply_overrides,
    config_to_dict,
    preset_description,
    preset_names,
)
from deepseek_tf.config.schema import Config
from deepseek_tf.data.corpus import read_texts, resolve_files
from deepseek_tf.data.prepared import read_manifest
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.builder import parameter_count
from deepseek_tf.rundir import RunDir
from deepseek_tf.tokenizers import load_tokenizer_path


def vocab_from_data(config: Config) -> int:
    """The vocabulary a new run of `config` would get: the prepared data's, a tokenizer
    file's, the BPE target size, or the corpus's distinct characters."""
    if config.data.prepared:
        return read_manifest(config.data.prepared)["vocab_size"]
    if config.data.tokenizer == "bpe":
        return config.data.vocab_size
    if config.data.tokenizer != "char":  # a tokenizer file or directory
        return load_tokenizer_path(config.data.tokenizer).vocab_size
    return len(set().union(*map(set, read_texts(resolve_files(config.data.files)))))


def training_state(run: RunDir) -> dict:
    """The run's progress from its metrics: `step` (the last logged; None before any),
    `steps` (the config's), `last_val_loss` / `last_val_step` and `best_val_loss` /
    `best_val_step` (None without evaluations), and `weights`: `"best"` when the run's
    model is its best validation's weights (`train.keep_best`), else `"last"`."""
    entries = run.metrics.read()
    steps = [e["step"] for e in entries if "step" in e]
    evals = [e for e in entries if "val_loss" in e and "step" in e]
    config = run.read_config()
    kept = config.train.keep_best and run.has_best()
    state = {"step": max(steps) if steps else None, "steps": config.train.steps,
             "weights": "best" if kept else "last"}  # fmt: skip
    last = evals[-1] if evals else {}
    best = min(evals, key=lambda e: e["val_loss"]) if evals else {}
    state.update(last_val_loss=last.get("val_loss"), last_val_step=last.get("step"),
                 best_val_loss=best.get("val_loss"), best_val_step=best.get("step"))  # fmt: skip
    return state


def info(
    run_dir=None,
    *,
    preset: str | None = None,
    config: Config | str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    presets: bool = False,
) -> dict:
    """What a run, preset or config file is (`deepseek-tf info`), without building it.

    Args:
        run_dir: a run directory; or else
        preset: a bundled preset; or
        config: a `Config` or a YAML config file; neither: the default preset.
        overrides: `section.key=value` changes (`--set`) applied first.
        presets: list the bundled presets instead (nothing else is read).

    Returns:
        With `presets`: `{"presets": {name: one-line description}}`. Otherwise a dict:
        `config` (the resolved config as nested dicts), `parameters` (`total`,
        `activated` per token, and their parts), `vocab_size` (the model's, or what a new
        run would get), `training` (a run's `training_state`, else None) and
        `compression` (a run's compression history, oldest first).

    Raises:
        ConfigError: a run directory together with `preset`/`config`, or a bad config.
        RunDirError: `run_dir` holds no run.
    """
    if presets:
        return {"presets": {name: preset_description(name) for name in preset_names()}}
    if run_dir is not None and (preset is not None or config is not None):
        raise ConfigError("info: give a run directory or --preset/--config, not both")
    run = RunDir(run_dir) if run_dir is not None else None
    if run is not None:
        resolved = apply_overrides(run.read_config(), overrides)
    else:
        resolved = resolve_config(config, preset=preset, overrides=overrides)
    vocab = resolved.model.vocab_size or vocab_from_data(resolved)
    return {
        "config": config_to_dict(resolved),
        "parameters": parameter_count(resolved, vocab),
        "vocab_size": vocab,
        "training": training_state(run) if run is not None else None,
        "compression": run.read_history() if run is not None else [],
    }
