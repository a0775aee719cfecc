"""The Python API: train a config into a run directory, load a run back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from deepseek_tf.config.loader import load_run_config
from deepseek_tf.config.schema import Config


def prepare_tokenizer(config: Config, run_dir=None, resume: bool = False):
    """The run's tokenizer: loaded from `run_dir` when resuming, else trained on the corpus.

    Returns `(config with model.vocab_size resolved, tokenizer)`.
    """
    from deepseek_tf.data.corpus import read_texts, resolve_files
    from deepseek_tf.tokenizers import load_tokenizer, train_tokenizer

    if resume and run_dir is not None and Path(run_dir, "config.yaml").exists():
        tokenizer = load_tokenizer(run_dir)
    else:
        texts = read_texts(resolve_files(config.data.files))
        tokenizer = train_tokenizer(config.data.tokenizer, texts, config.data.vocab_size)
    model = dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size)
    return dataclasses.replace(config, model=model), tokenizer


def train(config: Config, run_dir, *, resume: bool = False, verbose: int = 1) -> dict:
    """Trains `config` into `run_dir` (or continues it); returns the run summary."""
    from deepseek_tf.training.runtime import configure_threads, make_strategy
    from deepseek_tf.training.trainer import Trainer

    configure_threads(config.runtime)  # before TensorFlow runs its first op ...
    strategy = make_strategy(config.runtime)  # ... and multi-worker needs its strategy first
    config, tokenizer = prepare_tokenizer(config, run_dir, resume)
    trainer = Trainer(config, run_dir, tokenizer, resume=resume, verbose=verbose, strategy=strategy)
    return trainer.train()


def load(run_dir):
    """Loads a run directory: returns `(model, tokenizer)` with the latest weights.

    The tokenizer is None for a run that has none (e.g. a converted checkpoint
    whose source shipped no `tokenizer.json`); the model then takes token ids.
    """
    from deepseek_tf.errors import RunDirError
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.tokenizers import load_tokenizer
    from deepseek_tf.training.checkpoint import restore_weights

    config = load_run_config(run_dir)
    try:
        tokenizer = load_tokenizer(run_dir)
    except RunDirError:
        tokenizer = None
    model = build_model(config)  # the config's vocab_size (may exceed the tokenizer's)
    if config.model.quantize != "none":  # a `compress quantize/qat` run: quantized variables
        from deepseek_tf.compress.quantize import apply_quantized_structure

        apply_quantized_structure(model, config.model)
    restore_weights(run_dir, model)
    return model, tokenizer
