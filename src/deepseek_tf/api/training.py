"""Training verbs of the Python API: `train` (one process or a `runtime.strategy`) and
`federated` (the config's `federated` section), each into a run directory.

`deepseek-tf train` and `deepseek-tf federated` print what these return; their flags are
the keywords (`--init-from` -> `init_from`, `--set` -> `overrides`), with the same
defaults and the same one-line errors (`deepseek_tf.errors`).

Examples:

>>> import deepseek_tf as ds                                              # doctest: +SKIP
>>> summary = ds.train(preset="shakespeare-char", out="runs/char", sample_tokens=100,
...                    overrides=["train.steps=200"])                     # doctest: +SKIP
>>> summary["best_val_loss"], summary["sample"][:20]                      # doctest: +SKIP
(2.31, '\\nROMEO:\\nI wil the ')
>>> ds.federated(preset="shakespeare-char", out="runs/fed", clients=4,
...              clients_per_round=2, rounds=3)["rounds"]                 # doctest: +SKIP
3
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from deepseek_tf.api.generation import generate
from deepseek_tf.config.loader import apply_overrides, load_config, update_config
from deepseek_tf.config.schema import TOKENIZER_TYPES, Config
from deepseek_tf.convert.init_from import init_config, load_initial_weights, source_config
from deepseek_tf.data.corpus import read_texts, resolve_files
from deepseek_tf.data.prepared import read_manifest
from deepseek_tf.errors import ConfigError, RunDirError, TokenizerError, check_count
from deepseek_tf.federated import require_flower
from deepseek_tf.federated.engine import FederatedRun, prepare_clients
from deepseek_tf.models.footprint import check_fits
from deepseek_tf.rundir import RunDir
from deepseek_tf.tokenizers import load_tokenizer_path
from deepseek_tf.tokenizers import train_tokenizer as fit_tokenizer
from deepseek_tf.training.autobatch import MIB, find_batch_size
from deepseek_tf.training.runtime import configure_threads, make_strategy
from deepseek_tf.training.trainer import Trainer

DEFAULT_PRESET = "shakespeare-char"
SAMPLE_PROMPT = "\n"  # the sample after training starts a new line of the corpus


def resolve_config(config=None, *, preset=None, overrides: Sequence[str] = ()) -> Config:
    """The `Config` named by `config` (a `Config`, or a YAML file path like `--config`) or
    `preset`, with `overrides` (`section.key=value`, like `--set`) applied; neither gives
    the default preset (shakespeare-char).

    Raises:
        ConfigError: both `config` and `preset`, or a bad file, preset or override.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    if config is not None and preset is not None:
        raise ConfigError("give --preset or --config, not both")
    if isinstance(config, Config):
        return apply_overrides(config, overrides)
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"--config: a Config or a YAML file path, got {type(config).__name__}")
    return load_config(preset=preset, path=config, overrides=overrides)


def prepare_tokenizer(config: Config, run_dir=None, resume: bool = False, init_from=None):
    """The run's tokenizer: loaded from `run_dir` when resuming, from `init_from` when
    fine-tuning, from `data.prepared` or a `data.tokenizer` file, else trained on the corpus.

    Returns:
        `(config with model.vocab_size resolved, tokenizer)`. An explicit
        `model.vocab_size` may exceed the tokenizer's (padded embedding rows), never fall
        short of it (a `ConfigError`).
    """
    if resume:
        tokenizer = RunDir(run_dir).read_tokenizer()
    elif init_from is not None:
        tokenizer = source_config(init_from)[1]
    elif config.data.prepared:  # `data prepare` wrote its tokenizer beside the shards
        kind = read_manifest(config.data.prepared)["tokenizer"]
        tokenizer = load_tokenizer_path(config.data.prepared, key="data.prepared")
        config = update_config(config, data={"tokenizer": kind})
    elif config.data.tokenizer not in TOKENIZER_TYPES:  # a file from `tokenizer train`
        tokenizer = load_tokenizer_path(config.data.tokenizer)
    else:
        texts = read_texts(resolve_files(config.data.files))
        tokenizer = fit_tokenizer(
            config.data.tokenizer, texts=texts, vocab_size=config.data.vocab_size
        )
    vocab = config.model.vocab_size
    if vocab and vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
            "tokens (0 takes the tokenizer's size)"
        )
    return update_config(config, model={"vocab_size": vocab or tokenizer.vocab_size}), tokenizer


def _open_run(out, resume: bool) -> RunDir:
    """The run directory: an existing run to continue, or a place a new run may go."""
    run = RunDir(out)
    if resume and not run.path.exists():
        raise RunDirError(f"--resume: the run directory {out} does not exist")
    return run.require() if resume else run.check_new()


def _run_config(config, preset, overrides, resume: bool, out) -> Config:
    """The config of a new run, or of the run in `out` when resuming (its own, with
    `overrides`; a `Config` object given with `resume` replaces it, as a script may)."""
    if not resume:
        return resolve_config(config, preset=preset, overrides=overrides)
    if not out:
        raise ConfigError("--resume needs --out RUN_DIR")
    if preset is not None or (config is not None and not isinstance(config, Config)):
        raise ConfigError("--resume continues the run's own config; drop --preset/--config")
    run = _open_run(out, resume=True)
    return apply_overrides(config if config is not None else run.read_config(), overrides)


def _train_config(config, preset, overrides, resume, init_from, out, data) -> Config:
    """`train`'s config: the run's own (`resume`), the source's model (`init_from`), or a
    preset / file; then `data` as `data.files`."""
    if resume and init_from is not None:
        raise ConfigError("--init-from starts a new run; --resume continues one (pick one)")
    if init_from is not None:
        if not out:
            raise ConfigError("--init-from needs --out NEW_RUN_DIR")
        given = config is not None or preset is not None
        base = resolve_config(config, preset=preset) if given else None
        config = init_config(init_from, base, list(overrides))[0]
    else:
        config = _run_config(config, preset, overrides, resume, out)
    if data is not None:
        files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if not files:
            raise ConfigError("--data: give at least one file or glob")
        config = update_config(config, data={"files": [os.fspath(f) for f in files]})
    return config


def _batch_size(config: Config, batch_size) -> Config:
    """`batch_size` N as `train.batch_size` ("auto" is resolved later, by measuring)."""
    if batch_size is None or batch_size == "auto":
        return config
    text = str(batch_size)
    if isinstance(batch_size, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--batch-size: a positive integer or 'auto', got {batch_size!r}")
    return update_config(config, train={"batch_size": int(text)})


def _auto_batch_size(config, tokenizer, replicas: int, memory_budget: float, verbose) -> Config:
    """`batch_size="auto"`: the largest global batch whose step fits `memory_budget` MiB
    per device (0: 80% of the GPU's memory or of the available RAM)."""
    if config.runtime.strategy in ("multi_worker", "tpu"):
        raise ConfigError(
            f"--batch-size auto measures one device; set train.batch_size for "
            f"runtime.strategy={config.runtime.strategy}"
        )
    budget = int(memory_budget * MIB) if memory_budget else None
    found = find_batch_size(config, tokenizer.vocab_size, budget, log=print if verbose else None)
    batch = found["batch_size"] * replicas  # the probe measured one device
    if verbose:
        print(
            f"[batch-size auto] {found['batch_size']} sequences of {found['seq_len']} tokens "
            f"per device x {replicas} device(s) = global batch {batch} (step ~"
            f"{found['confirmed_step_mib']:.0f} MiB of {found['budget_mib']:.0f} MiB budget; "
            f"{found['per_sequence_mib']:.2f} MiB per sequence)",
            flush=True,
        )
    return update_config(config, train={"batch_size": batch})


def _check_train_options(batch_size, memory_budget: float, sample_tokens: int) -> None:
    check_count("sample-tokens", sample_tokens, 0, error=ConfigError)
    if not memory_budget >= 0:  # also NaN
        raise ConfigError(f"--memory-budget: must be >= 0 MiB, got {memory_budget}")
    if memory_budget and batch_size != "auto":
        raise ConfigError("--memory-budget is the budget of --batch-size auto; add it or drop this")


def _sample(summary: dict, out, sample_tokens: int) -> None:
    """Adds `sample` (text generated from a new line by the trained run, or None) and
    `sample_note` (why there is none) to `summary`."""
    summary["sample"], summary["sample_note"] = None, None
    if not sample_tokens or summary.get("already_complete") or not summary.get("chief", True):
        return  # (other workers of a multi-worker job write no run directory)
    try:  # a sample is a courtesy: a vocabulary without "\n" gets none
        summary["sample"] = generate(out, SAMPLE_PROMPT, max_new_tokens=sample_tokens)[0]
    except TokenizerError as e:
        summary["sample_note"] = str(e)


def train(
    config: Config | str | os.PathLike | None = None,
    *,
    out=None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    init_from=None,
    batch_size: int | str | None = None,
    memory_budget: float = 0.0,
    sample_tokens: int = 300,
    data: Sequence[str] | None = None,
    verbose: int = 1,
) -> dict:
    """Trains a model into a run directory, or continues one (`deepseek-tf train`).

    Args:
        config: a `Config`, or a YAML config file (`--config`); None: `preset`.
        out: the run directory (default `runs/<preset>-<time>`; needed by `resume`
            and `init_from`). A new run refuses a directory that holds checkpoints.
        preset: a bundled preset (`info(presets=True)`); neither: shakespeare-char.
        overrides: `section.key=value` changes (`--set`), type-checked.
        resume: continue the run in `out` with its own config (plus `overrides`; a
            `Config` given as `config` replaces it) from its newest readable checkpoint;
            nothing is written before that checkpoint is restored.
        init_from: fine-tune: a run or Hugging Face directory whose model section,
            tokenizer and weights start a new run with a fresh optimizer (`config` or
            `preset` give train/data; LoRA with `overrides=["train.lora_rank=8"]`).
        batch_size: sequences per step (sets `train.batch_size`), or "auto": the largest
            batch whose step fits `memory_budget`.
        memory_budget: with `batch_size="auto"`: MiB one step may add per device (0: 80%
            of the GPU's memory, or of the available RAM).
        sample_tokens: tokens of text sampled from the trained run (0: none).
        data: text files or globs to train on (sets `data.files`; default the bundled
            tiny-Shakespeare corpus).
        verbose: 0 prints nothing; 1 progress lines.

    Returns:
        The run's summary, a dict: `step`, `steps`, `run_dir`, `checkpoint`,
        `wall_seconds`, `train_seconds`, `train_tokens_per_sec`, `best_val_loss` and
        `best_val_step` (None without evaluation), `weights` (which are the run's model:
        "best", the best validation's in `best_checkpoint` with `train.keep_best`, or
        "last"), `loss_curves` (a path or None),
        `chief` (False on a non-chief worker), `stopped` (why a run ended early, when it
        did), `already_complete` (a resumed run that was done), plus `sample` (the
        sampled text or None), `sample_note` (why there is no sample) and
        `example_prompt` (a prompt that suits the corpus, for the next commands).

    Raises:
        ConfigError, DataError, RunDirError, TrainingError: one-line messages naming the
        option, key or file.

    Examples:

    >>> train(preset="shakespeare-char", out="runs/char", sample_tokens=0,
    ...       overrides=["train.steps=20"])["step"]                  # doctest: +SKIP
    20
    """
    _check_train_options(batch_size, memory_budget, sample_tokens)
    config = _train_config(config, preset, overrides, resume, init_from, out, data)
    config = _batch_size(config, batch_size)
    out = out or f"runs/{preset or DEFAULT_PRESET}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = _open_run(out, resume)
    configure_threads(config.runtime)  # before TensorFlow runs its first op ...
    strategy = make_strategy(config.runtime)  # ... and multi-worker needs its strategy first
    config, tokenizer = prepare_tokenizer(config, out, resume, init_from)
    if batch_size == "auto":
        replicas = strategy.num_replicas_in_sync
        config = _auto_batch_size(config, tokenizer, replicas, memory_budget, verbose)
    check_fits(config, purpose="train")
    load_weights = None
    if init_from is not None:
        load_weights = functools.partial(load_initial_weights, source=init_from)
    trainer = Trainer(
        config, run.path, tokenizer, resume=resume, verbose=verbose, strategy=strategy,
        init_from=init_from, load_weights=load_weights,
    )  # fmt: skip
    summary = trainer.train()
    summary.setdefault("run_dir", str(run.path))
    _sample(summary, run.path, sample_tokens)
    bundled = not (config.data.files or config.data.prepared)
    summary["example_prompt"] = "ROMEO:" if bundled else "Once upon a time"
    return summary


def _federated_config(config, preset, overrides, resume, out, flags: dict) -> Config:
    """`federated`'s config: a preset / file or the run's own, then the flags given."""
    config = _run_config(config, preset, overrides, resume, out)
    changes = {key: value for key, value in flags.items() if value is not None}
    if not changes.get("secure_aggregation"):  # False keeps the config's setting
        changes.pop("secure_aggregation", None)
    f = config.federated
    clients = changes.get("clients", f.clients)
    per_round = changes.get("clients_per_round", f.clients_per_round)
    if per_round > clients:  # say which option fixes it
        raise ConfigError(
            f"federated.clients_per_round: {per_round} is more than the {clients} clients; "
            f"pass --clients-per-round (clients_per_round) of at most {clients}, or 0 for "
            "min(8, clients)"
        )
    config = update_config(config, federated=changes) if changes else config
    if config.train.ema_decay:  # the server's average is the model; no per-client one
        raise ConfigError("train.ema_decay: federated training does not keep a weight average")
    return config


def federated(
    config: Config | str | os.PathLike | None = None,
    *,
    out=None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    prepare_only: bool = False,
    clients: int | None = None,
    partition: str | None = None,
    rounds: int | None = None,
    clients_per_round: int | None = None,
    local_steps: int | None = None,
    algorithm: str | None = None,
    server_learning_rate: float | None = None,
    server_beta1: float | None = None,
    server_beta2: float | None = None,
    server_tau: float | None = None,
    dp_clip: float | None = None,
    dp_noise_multiplier: float | None = None,
    dp_delta: float | None = None,
    min_clients: int | None = None,
    round_timeout: float | None = None,
    eval_every: int | None = None,
    engine: str | None = None,
    secure_aggregation: bool = False,
    verbose: int = 1,
) -> dict:
    """Federated training over clients made from the corpus (`deepseek-tf federated`), or
    its continuation from the last completed round.

    Args:
        config, preset, overrides, out, resume: as `train` (default `out`:
            `runs/federated-<time>`).
        prepare_only: write the run directory (config, tokenizer, the clients' data) and
            stop; a Flower deployment (`flwr run`) then trains into it.
        clients ... engine: the `federated` section's keys of the same names (None keeps
            the config's): `clients`, `partition` (iid | by-speaker | dirichlet:ALPHA |
            by-file), `rounds`, `clients_per_round`, `local_steps` (each client's steps
            per round), `algorithm` (fedavg | fedprox:MU | fedadam | fedyogi), the server
            optimizer's `server_learning_rate` / `server_beta1` / `server_beta2` /
            `server_tau`, client-level DP (`dp_clip`, `dp_noise_multiplier`, `dp_delta`),
            `min_clients` (updates a round needs), `round_timeout` (seconds), `eval_every`
            (rounds) and `engine` (inprocess | flower: needs the `[federated]` extra).
        secure_aggregation: pairwise-masked sums (the server never sees one update).
        verbose: 0 prints nothing; 1 a line per round.

    Returns:
        A dict: `rounds`, `run_dir`, `checkpoint`, `seconds` and the last round's
        metrics; with `prepare_only`: `rounds` 0, `clients` (how many) and `run_dir`.

    Raises:
        ConfigError: e.g. `federated.clients_per_round` above `federated.clients`, or
            `engine="flower"` without Flower installed (before anything is written).

    Examples:

    >>> federated(preset="shakespeare-char", out="runs/fed", clients=4,
    ...           clients_per_round=2, rounds=2, local_steps=2)["rounds"]  # doctest: +SKIP
    2
    """
    flags = dict(clients=clients, partition=partition, rounds=rounds,
                 clients_per_round=clients_per_round, local_steps=local_steps,
                 algorithm=algorithm, server_learning_rate=server_learning_rate,
                 server_beta1=server_beta1, server_beta2=server_beta2, server_tau=server_tau,
                 dp_clip=dp_clip, dp_noise_multiplier=dp_noise_multiplier, dp_delta=dp_delta,
                 min_clients=min_clients, round_timeout=round_timeout, eval_every=eval_every,
                 engine=engine, secure_aggregation=secure_aggregation)  # fmt: skip
    config = _federated_config(config, preset, overrides, resume, out, flags)
    if config.train.stages:
        raise ConfigError(
            "train.stages: progressive training is `train`'s; a federated client trains "
            "federated.local_steps steps a round on data.seq_len sequences"
        )
    flower = config.federated.engine == "flower"
    if flower and not prepare_only:
        require_flower()  # a one-line install hint before anything is written
    out = out or f"runs/federated-{time.strftime('%Y%m%d-%H%M%S')}"
    run = _open_run(out, resume)
    configure_threads(config.runtime)
    config, tokenizer = prepare_tokenizer(config, out, resume)
    check_fits(config, purpose="train")
    clients_made = prepare_clients(config, run, resume)
    log = print if verbose else (lambda *_: None)
    if (prepare_only or flower) and not resume:  # Flower's apps read the run directory
        run.write_config(config)
        run.write_tokenizer(tokenizer)
    if prepare_only:
        return {"rounds": 0, "clients": len(clients_made), "run_dir": str(Path(out).resolve())}
    if flower:  # the optional extra, by name (`deepseek_tf.federated` is the verb)
        flower_app = importlib.import_module("deepseek_tf.federated.flower_app")
        return flower_app.simulate(run.path, config, clients_made, resume, log)
    return FederatedRun(config, out, tokenizer, clients_made, resume=resume, log=log).train()
