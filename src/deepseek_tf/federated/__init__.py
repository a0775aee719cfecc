"""Federated training (the brief's section 8.2) on Flower and dp-accounting.

`partition` (clients from a corpus), `client` (a client's local round with the one
training step), `rounds` (aggregation with DP and secure aggregation), `server_optimizer`
(FedAvg/FedProx/FedAdam/FedYogi), `privacy` (DP-FedAvg and its accounting),
`secure_aggregation` (pairwise masks), `engine` (the run: rounds, checkpoints, metrics),
`flower_app` (the same rounds as a Flower ServerApp/ClientApp; the [federated] extra).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def flower_project_dir() -> Path:
    """The Flower app project (`pyproject.toml`) that `flwr run` submits to a SuperLink."""
    return Path(str(resources.files("deepseek_tf") / "federated" / "flower_project"))
