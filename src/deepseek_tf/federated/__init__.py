"""Federated training (the brief's section 8.2) on Flower and dp-accounting.

`partition` (clients from a corpus), `client` (a client's local round with the one
training step), `rounds` (aggregation with DP and secure aggregation), `server_optimizer`
(FedAvg/FedProx/FedAdam/FedYogi), `privacy` (DP-FedAvg and its accounting),
`secure_aggregation` (pairwise masks), `engine` (the run: rounds, checkpoints, metrics),
`flower_app` (the same rounds as a Flower ServerApp/ClientApp; the [federated] extra).
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path

from deepseek_tf.errors import ConfigError

FLOWER_HINT = (
    "federated.engine=flower needs Flower, the [federated] extra: "
    "pip install 'deepseek-tf[federated]' (in a checkout: pip install -e \".[federated]\")"
)


def require_flower(*, simulation: bool = True) -> None:
    """Raises a one-line `ConfigError` with the install hint unless Flower (and, for the
    simulation engine, its Ray backend) can be imported; call it before writing anything.

    Args:
        simulation: also need `flwr[simulation]`'s Ray (`--engine flower` in one process);
            a deployment's SuperLink/SuperNodes need Flower alone.

    Examples:

    >>> import sys
    >>> saved = sys.modules.get("flwr")
    >>> sys.modules["flwr"] = None  # as if the extra were not installed
    >>> try:
    ...     require_flower()
    ... except ConfigError as e:
    ...     print(str(e).split(": ")[0])
    federated.engine=flower needs Flower, the [federated] extra
    >>> _ = sys.modules.pop("flwr") if saved is None else sys.modules.update(flwr=saved)
    """
    for module in ("flwr", "ray") if simulation else ("flwr",):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{FLOWER_HINT}; cannot import {e.name or module}") from None


def flower_project_dir() -> Path:
    """The Flower app project (`pyproject.toml`) that `flwr run` submits to a SuperLink."""
    return Path(str(resources.files("deepseek_tf") / "federated" / "flower_project"))
