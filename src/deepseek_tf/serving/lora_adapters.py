"""`serve RUN --lora NAME=RUN_DIR ...`: LoRA runs served beside their base model.

Each `RUN_DIR` is a run trained with `train.lora_rank` from the served run's weights
(`train --init-from BASE --set train.lora_rank=R`); a request whose `model` is `NAME`
decodes with that adapter, in the same batch as requests for the base and for other
adapters (`models.multi_lora`). The adapters' tokens are those of the merged model.

Examples:

>>> specs = parse_lora(["poet=runs/poet-lora", "bard=runs/bard-lora"])  # doctest: +SKIP
>>> config = serving_config(RunDir("runs/base").read_config(), specs)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from deepseek_tf.config.loader import update_config
from deepseek_tf.errors import InputError
from deepseek_tf.models.multi_lora import Adapter, read_adapter
from deepseek_tf.rundir import RunDir

MAX_ADAPTERS = 32


def parse_lora(lora: Sequence[str] | Mapping[str, str] | None) -> dict[str, Path]:
    """`{name: run directory}` from `NAME=RUN_DIR` strings (the command's `--lora`) or a
    mapping; InputError for a malformed entry, a repeated name, or too many adapters."""
    if not lora:
        return {}
    pairs = list(lora.items()) if isinstance(lora, Mapping) else []
    if not isinstance(lora, Mapping):
        for spec in lora:
            name, sep, path = str(spec).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise InputError(f"--lora {spec!r}: expected NAME=RUN_DIR")
            pairs.append((name.strip(), path.strip()))
    specs: dict[str, Path] = {}
    for name, path in pairs:
        if name in specs:
            raise InputError(f"--lora: the adapter name {name!r} is given twice")
        specs[name] = Path(path)
    if len(specs) > MAX_ADAPTERS:
        raise InputError(f"--lora: at most {MAX_ADAPTERS} adapters, got {len(specs)}")
    return specs


def serving_config(config, specs: Mapping[str, Path]):
    """The base run's config for serving `specs`: MLA decodes from its naive cache when
    an adapter changes `kv_b_proj` (absorbed decoding folds that kernel into fixed copies).
    Reads each adapter run's config (RunDirError: not a run)."""
    if config.model.attention != "mla" or not config.model.mla_absorb:
        return config
    for path in specs.values():
        targets = RunDir(path).require().read_config().train.lora_targets
        if "attention" in targets or "kv_b_proj" in targets:
            return update_config(config, model={"mla_absorb": False})
    return config


def load_adapters(specs: Mapping[str, Path], base) -> list[Adapter]:
    """Each run in `specs` loaded and read as an adapter of the served `base` model (one
    run in memory at a time)."""
    adapters = []
    for name, path in specs.items():
        run = RunDir(path).require()
        config = run.read_config()
        if not config.train.lora_rank:
            raise InputError(f"--lora {name}: {path} has no adapters (train.lora_rank is 0)")
        model, _ = run.load(config)
        adapters.append(read_adapter(name, model, config, base))
        del model
    return adapters
