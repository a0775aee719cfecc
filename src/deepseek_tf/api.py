"""The Python API: train a config (centrally or federated) into a run directory, load a run."""

from __future__ import annotations

import dataclasses

from deepseek_tf.config.schema import TOKENIZER_TYPES, Config
from deepseek_tf.data.corpus import read_texts, resolve_files
from deepseek_tf.data.prepared import read_manifest
from deepseek_tf.errors import ConfigError
from deepseek_tf.federated.engine import FederatedRun, prepare_clients
from deepseek_tf.models.footprint import check_fits
from deepseek_tf.rundir import RunDir
from deepseek_tf.tokenizers import load_tokenizer_path, train_tokenizer
from deepseek_tf.training.init_from import source_config
from deepseek_tf.training.runtime import configure_threads, make_strategy
from deepseek_tf.training.trainer import Trainer


def prepare_tokenizer(config: Config, run_dir=None, resume: bool = False, init_from=None):
    """The run's tokenizer: loaded from `run_dir` when resuming, from `init_from` when
    fine-tuning, else trained on the corpus.

    Returns `(config with model.vocab_size resolved, tokenizer)`. An explicit
    `model.vocab_size` may exceed the tokenizer's (padded embedding rows), never fall
    short of it.
    """
    if resume:
        tokenizer = RunDir(run_dir).read_tokenizer()
    elif init_from is not None:
        tokenizer = source_config(init_from)[1]
    elif config.data.prepared:  # `data prepare` wrote its tokenizer beside the shards
        kind = read_manifest(config.data.prepared)["tokenizer"]
        tokenizer = load_tokenizer_path(config.data.prepared, key="data.prepared")
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=kind))
    elif config.data.tokenizer not in TOKENIZER_TYPES:  # a file from `tokenizer train`
        tokenizer = load_tokenizer_path(config.data.tokenizer)
    else:
        texts = read_texts(resolve_files(config.data.files))
        tokenizer = train_tokenizer(config.data.tokenizer, texts, config.data.vocab_size)
    vocab = config.model.vocab_size
    if vocab and vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
            "tokens (0 takes the tokenizer's size)"
        )
    model = dataclasses.replace(config.model, vocab_size=vocab or tokenizer.vocab_size)
    return dataclasses.replace(config, model=model), tokenizer


def train(
    config: Config, run_dir, *, resume: bool = False, verbose: int = 1, init_from=None
) -> dict:
    """Trains `config` into `run_dir` (or continues it); returns the run summary.

    `resume=True` needs a run in `run_dir` (its own config and tokenizer) and writes
    nothing there until its newest readable checkpoint is restored. `init_from` (a
    run or a Hugging Face directory) starts a new run from its weights and tokenizer
    with a fresh optimizer; `config` comes from `training.init_from.init_config`.
    """
    run = RunDir(run_dir)
    if resume:
        run.require()
    else:
        run.check_new()
    if resume and init_from is not None:
        raise ConfigError("--init-from starts a new run; --resume continues one (pick one)")
    configure_threads(config.runtime)  # before TensorFlow runs its first op ...
    strategy = make_strategy(config.runtime)  # ... and multi-worker needs its strategy first
    config, tokenizer = prepare_tokenizer(config, run_dir, resume, init_from)
    check_fits(config, purpose="train")
    trainer = Trainer(
        config,
        run_dir,
        tokenizer,
        resume=resume,
        verbose=verbose,
        strategy=strategy,
        init_from=init_from,
    )
    return trainer.train()


def train_federated(
    config: Config, run_dir, *, resume: bool = False, verbose: int = 1, prepare_only=False
) -> dict:
    """Federated training of `config` (its `federated` section) into `run_dir`, or its
    continuation from the last completed round; returns the last round's summary.

    `prepare_only` writes the run directory (config, tokenizer, the clients' data) and
    stops: a Flower deployment (`flwr run`) then trains into it.
    """
    if config.train.ema_decay:  # the server's average is the model; no per-client one
        raise ConfigError("train.ema_decay: federated training does not keep a weight average")
    run = RunDir(run_dir)
    if resume:
        run.require()
    else:
        run.check_new()
    configure_threads(config.runtime)
    config, tokenizer = prepare_tokenizer(config, run_dir, resume)
    check_fits(config, purpose="train")
    clients = prepare_clients(config, run, resume)
    log = print if verbose else (lambda *_: None)
    if prepare_only or config.federated.engine == "flower":  # Flower's apps read the run
        if not resume:
            run.write_config(config)
            run.write_tokenizer(tokenizer)
        if prepare_only:
            return {"rounds": 0, "clients": len(clients), "run_dir": str(run.path)}
    if config.federated.engine == "flower":
        import deepseek_tf.federated.flower_app as flower_app  # the optional [federated] extra

        return flower_app.simulate(run.path, config, clients, resume, log)
    fed = FederatedRun(config, run_dir, tokenizer, clients, resume=resume, log=log)
    return fed.train()


def load(run_dir):
    """Loads a run directory: returns `(model, tokenizer)` with the latest weights.

    The tokenizer is None for a run that has none (e.g. a converted checkpoint
    whose source shipped no `tokenizer.json`); the model then takes token ids.
    """
    run = RunDir(run_dir)
    config = run.read_config()
    check_fits(config, purpose="inference")
    return run.load(config)
