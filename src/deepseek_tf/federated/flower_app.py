"""The Flower engine: the same rounds through Flower's `ServerApp` / `ClientApp` (flwr 1.42).

The `ServerApp`'s main loop is `FederatedRun.train` itself, with a `GridEngine` that asks
Flower's nodes for the sampled clients' updates instead of training them in-process;
aggregation, DP, checkpoints and metrics are the in-process engine's. Each node plays the
client of its `partition-id` (node config): it trains with the same `LocalTrainer` on its
own data file and replies with its update. A node that fails or times out is left out of
the round (the round needs `federated.min_clients` updates).

- Simulation (`deepseek-tf federated --engine flower`): `flwr.simulation.run_simulation`
  with one SuperNode per client (Ray actors in this machine).
- Deployment: a SuperLink and SuperNodes started with Flower's own commands and the app
  submitted with `flwr run` (see the README); the ServerApp and ClientApp read the run
  directory named by the run config `run-dir` (written by `federated --prepare-only`);
  a SuperNode on another machine names its own copy of the run directory and its data
  with `--node-config "partition-id=3 run-dir=/path/run data-file=/path/text.txt"`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from deepseek_tf.errors import ConfigError
from deepseek_tf.federated import FLOWER_HINT

try:  # the [federated] extra: one line with the install hint, not a traceback
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as e:
    raise ConfigError(f"{FLOWER_HINT}; cannot import {e.name or 'flwr'}") from None

from deepseek_tf.federated.client import LocalTrainer
from deepseek_tf.federated.engine import FederatedRun, prepare_clients
from deepseek_tf.federated.partition import Client
from deepseek_tf.federated.server_optimizer import parse_algorithm
from deepseek_tf.rundir import RunDir

log = logging.getLogger("flwr")
server_app = ServerApp()
client_app = ClientApp()
SIMULATION: dict = {}  # what `run_simulation` cannot pass: its ServerApp gets no run config
POLL_SECONDS = 0.2


def send_and_collect(grid: Grid, messages: list[Message], timeout: float):
    """Pushes `messages` and pulls the replies until `timeout`: `({node: reply}, {node:
    reason})`, every addressed node in one of the two."""
    ids = list(grid.push_messages(messages))
    pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
    failed = {m.metadata.dst_node_id: "not delivered" for mid, m in zip(ids, messages) if not mid}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():  # the ClientApp raised, or the node went away
                failed[node] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                replies[node] = reply
        if pending:
            time.sleep(POLL_SECONDS)
    failed.update({node: "timed out" for node in pending.values()})
    return replies, failed


class GridEngine:
    """`run_clients` through Flower's grid: the sampled clients' nodes train and reply."""

    def __init__(self, grid: Grid, run_dir, config, log_fn=print):
        self.grid, self.run_dir, self.config, self.log = grid, str(run_dir), config, log_fn
        self.timeout = config.federated.round_timeout
        self._nodes: dict[int, int] = {}  # partition id -> node id

    def _discover(self) -> None:
        """Asks every connected node which partition it plays."""
        deadline = time.monotonic() + self.timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.config.federated.min_clients or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        messages = [Message(RecordDict({"config": ConfigRecord({"run-dir": self.run_dir})}),
                            dst_node_id=node, message_type=MessageType.QUERY)
                    for node in nodes]  # fmt: skip
        replies, _ = send_and_collect(self.grid, messages, self.timeout)
        self._nodes = {int(r.content["metrics"]["partition-id"]): n for n, r in replies.items()}

    def run_clients(self, weights, sampled, round_index) -> list[dict]:
        if not all(k in self._nodes for k in sampled):
            self._discover()
        messages, asked = [], {}
        for k in sampled:
            if k not in self._nodes:
                self.log(f"[federated] client {k}: no Flower node plays it; skipped")
                continue
            config = ConfigRecord({"round": round_index, "client": k, "run-dir": self.run_dir})
            content = RecordDict({"arrays": ArrayRecord(weights), "config": config})
            messages.append(
                Message(
                    content,
                    dst_node_id=self._nodes[k],
                    message_type=MessageType.TRAIN,
                    group_id=str(round_index),
                )
            )
            asked[self._nodes[k]] = k  # fmt: skip
        replies, failed = send_and_collect(self.grid, messages, self.timeout)
        for node, reason in failed.items():
            self.log(f"[federated] client {asked[node]} (node {node}) failed in round "
                     f"{round_index + 1}: {reason}; the round goes on without it")  # fmt: skip
            self._nodes.pop(asked[node], None)  # ask again who is there next round
        results = []
        for node, reply in replies.items():
            metrics = reply.content["metrics"]
            results.append({
                "client": asked[node],
                "update": reply.content["arrays"].to_numpy_ndarrays(),
                "loss": float(metrics["loss"]),
                "tokens": int(metrics["tokens"]),
                "weight": float(metrics["weight"]),
            })  # fmt: skip
        return sorted(results, key=lambda r: r["client"])


@server_app.main()
def _server(grid: Grid, context: Context) -> None:
    settings = {**SIMULATION, **dict(context.run_config)}
    run = RunDir(settings["run-dir"])
    config = settings.get("config") or run.read_config()  # a simulation passes its own
    tokenizer = run.read_tokenizer()
    clients = prepare_clients(config, run, resume=True)
    resume = bool(settings.get("resume", False)) or run.has_checkpoints()
    engine = GridEngine(grid, run.path, config, log_fn=settings.get("log", log.info))
    fed = FederatedRun(config, run.path, tokenizer, clients, resume=resume, engine=engine,
                       log=settings.get("log", log.info))  # fmt: skip
    SIMULATION["summary"] = fed.train()


_TRAINERS: dict[str, LocalTrainer] = {}  # one per run directory in each node process


def _node_settings(msg: Message, context: Context) -> tuple[int, RunDir, str]:
    node = context.node_config
    partition = int(node.get("partition-id", 0))
    run = RunDir(node.get("run-dir") or msg.content["config"]["run-dir"])
    data = node.get("data-file") or str(run.path / "clients" / f"client_{partition:03d}.txt")
    return partition, run, str(data)


@client_app.query()
def _describe(msg: Message, context: Context) -> Message:
    partition, _, _ = _node_settings(msg, context)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition})}),
                   reply_to=msg)  # fmt: skip


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    partition, run, data = _node_settings(msg, context)
    config = msg.content["config"]
    if partition != int(config["client"]):
        raise ValueError(f"this node plays client {partition}, not {config['client']}")
    key = str(run.path.resolve())
    if key not in _TRAINERS:
        run_config = run.read_config()
        _, mu = parse_algorithm(run_config.federated.algorithm)
        _TRAINERS[key] = LocalTrainer(run_config, run.read_tokenizer(), proximal_mu=mu)
    weights = msg.content["arrays"].to_numpy_ndarrays()
    out = _TRAINERS[key].run([np.asarray(w) for w in weights], data, int(config["round"]))
    size = len(Path(data).read_text(encoding="utf-8"))  # FedAvg's n_k, as in-process
    metrics = MetricRecord({"loss": out["loss"], "tokens": out["tokens"], "weight": float(size)})
    return Message(RecordDict({"arrays": ArrayRecord(out["update"]), "metrics": metrics}),
                   reply_to=msg)  # fmt: skip


def simulate(run_dir, config, clients: list[Client], resume: bool, log_fn) -> dict:
    """Runs the federated rounds of `run_dir` in Flower's simulation engine (Ray)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from flwr.simulation import run_simulation  # the [federated] extra's Ray backend

    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every step at DEBUG
    SIMULATION.clear()
    SIMULATION.update({"run-dir": str(run_dir), "config": config, "resume": resume,
                       "log": log_fn})  # fmt: skip
    backend = {
        "init_args": {"num_cpus": 1, "object_store_memory": 100 * 2**20,
                      "logging_level": logging.ERROR, "log_to_driver": False,
                      "include_dashboard": False},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }  # fmt: skip
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(clients),
                   backend_config=backend)  # fmt: skip
    if "summary" not in SIMULATION:
        raise RuntimeError("the Flower simulation ended without finishing its rounds")
    return SIMULATION["summary"]
