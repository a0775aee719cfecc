"""`deepseek-tf federated`: rounds of client training and server aggregation, as a run.

The run directory is an ordinary run (`config.yaml` with its `federated` section, the
tokenizer, `checkpoints/` of the global model, `metrics.jsonl`, `logs/`) plus `clients/`
(the partitioned data). Each round's checkpoint holds the global weights, the server
optimizer's moments and the round number, so `--resume` continues from the last
completed round (client sampling and local data positions depend only on the seed and
the round). `eval`, `generate`, `export`, `serve` and `compress` take the run like any
other.

Engines: `inprocess` (pure TensorFlow, one process: every sampled client is trained in
turn on one model) and `flower` (the same client and server code through Flower's
`ServerApp`/`ClientApp`, see `federated.flower_app`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import tensorflow as tf

from deepseek_tf.data.pipeline import make_eval_dataset
from deepseek_tf.federated.client import LocalTrainer
from deepseek_tf.federated.partition import Client, partition
from deepseek_tf.federated.privacy import check_dp, epsilon
from deepseek_tf.federated.rounds import aggregate, sample_clients
from deepseek_tf.federated.server_optimizer import ServerOptimizer, parse_algorithm
from deepseek_tf.rundir import RunDir
from deepseek_tf.training.evaluate import evaluate

CLIENTS_DIR = "clients"
CLIENTS_FILE = "clients.json"


class ServerState(tf.Module):
    """The server optimizer's moments as variables (saved in each round's checkpoint)."""

    def __init__(self, optimizer: ServerOptimizer):
        super().__init__(name="server_state")
        self.optimizer = optimizer
        self.slots = {k: tf.Variable(v, trainable=False) for k, v in optimizer.state().items()}

    def store(self) -> None:
        for key, value in self.optimizer.state().items():
            self.slots[key].assign(value)

    def load(self) -> None:
        self.optimizer.load_state({k: v.numpy() for k, v in self.slots.items()})


def prepare_clients(config, run: RunDir, resume: bool) -> list[Client]:
    """The partition of a new run (written to `clients/`), or a resumed run's own."""
    f = config.federated
    listing = run.path / CLIENTS_FILE
    if resume and listing.is_file():
        return [Client(**c) for c in json.loads(listing.read_text(encoding="utf-8"))]
    clients = partition(config.data, f.partition, f.clients, run.path / CLIENTS_DIR,
                        seed=config.train.seed)  # fmt: skip
    run.path.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps([c.__dict__ for c in clients], indent=1), encoding="utf-8")
    return clients


class FederatedRun:
    """Rounds of federated training into a run directory (see the module docstring).

    Args:
        config: the resolved config (its `federated` section drives the rounds).
        run_dir: the run directory (written like `train`'s).
        tokenizer: the shared tokenizer.
        clients: the partition (`prepare_clients`).
        resume: continue from the last completed round.
        log: progress printer.
        engine: `None` for the in-process engine, or an object with `run_clients(...)`
            (the Flower engine).
    """

    def __init__(self, config, run_dir, tokenizer, clients, *, resume=False, log=print,
                 engine=None):  # fmt: skip
        f = config.federated
        self.config, self.run, self.tokenizer = config, RunDir(run_dir), tokenizer
        self.clients, self.log, self.engine = clients, log, engine
        self.algorithm, mu = parse_algorithm(f.algorithm)
        self.dp = check_dp(f.dp_clip, f.dp_noise_multiplier, f.dp_delta, f.clients)
        self.trainer = LocalTrainer(config, tokenizer, proximal_mu=mu)
        self.weights = self.trainer.get_weights()
        self.server = ServerOptimizer(self.algorithm, f.server_learning_rate, f.server_beta1,
                                      f.server_beta2, f.server_tau,
                                      [w.shape for w in self.weights])  # fmt: skip
        self.state = ServerState(self.server)
        self.checkpoint = self.run.checkpoint(self.trainer.model, self.state,
                                              config.train.keep_checkpoints)  # fmt: skip
        self.start_round = 0
        if resume and self.run.has_checkpoints():
            self.start_round = self.checkpoint.restore()
            self.state.load()
            self.weights = self.trainer.get_weights()
            self.log(f"[resume] restored round {self.start_round} of {f.rounds}")

    # -- one round -------------------------------------------------------------------------
    def _run_clients(self, sampled: list[int], round_index: int) -> list[dict]:
        if self.engine is not None:
            return self.engine.run_clients(self.weights, sampled, round_index)
        results = []
        for k in sampled:
            try:
                out = self.trainer.run(self.weights, self.clients[k].path, round_index)
            except Exception as e:  # noqa: BLE001 - one client's failure never ends a round
                self.log(
                    f"[federated] client {k} failed in round {round_index + 1} "
                    f"({type(e).__name__}: {str(e)[:200]}); the round goes on without it"
                )
                continue  # fmt: skip
            results.append({**out, "client": k, "weight": self.clients[k].chars})
        return results

    def validation_loss(self) -> float:
        """The global model's loss on every client's validation part together."""
        self.trainer.set_weights(self.weights)
        data = dataclasses.replace(self.config.data, files=tuple(c.path for c in self.clients))
        ds = make_eval_dataset(data, self.tokenizer, self.config.train.batch_size, split="val")
        return evaluate(self.trainer.model, ds, jit_compile=self.config.runtime.jit_compile)["loss"]

    def train(self) -> dict:
        f = self.config.federated
        if self.start_round == 0:
            self.run.write_config(self.config)
            self.run.write_tokenizer(self.tokenizer)
        else:  # restored: drop later metrics, keep a changed config (e.g. more rounds)
            self.run.metrics.truncate_after(self.start_round)
            if self.run.read_config() != self.config:
                self.run.write_config(self.config)
        writer = tf.summary.create_file_writer(str(self.run.logs_dir))
        rate = f.clients_per_round / f.clients
        wall = time.perf_counter()
        last = None
        for r in range(self.start_round, f.rounds):
            started = time.perf_counter()
            sampled = sample_clients(f.clients, f.clients_per_round, r, self.config.train.seed,
                                     poisson=self.dp.enabled)  # fmt: skip
            results = self._run_clients(sampled, r)
            rng = np.random.default_rng([self.config.train.seed, 7, r])  # DP noise, per round
            answered = len(results)
            delta, info = aggregate(
                results, self.weights, dp=self.dp, expected_clients=f.clients_per_round,
                secure=f.secure_aggregation, frac_bits=f.secagg_frac_bits,
                threshold=f.secagg_threshold, round_index=r, rng=rng, log=self.log,
            )  # fmt: skip
            usable = len(info["accepted"]) >= min(f.min_clients, max(len(sampled), 1))
            if delta is not None and usable:
                self.weights = self.server.apply(self.weights, delta)
            else:
                self.log(f"[federated] round {r + 1}: {len(info['accepted'])} usable updates of "
                         f"{len(sampled)} asked; the global model is unchanged")  # fmt: skip
            entry = self._round_entry(r, sampled, results, answered, info, rate, started)
            if (f.eval_every and (r + 1) % f.eval_every == 0) or r + 1 == f.rounds:
                entry["val_loss"] = self.validation_loss()
            self._write(entry, writer)
            self.trainer.set_weights(self.weights)
            self.state.store()
            self.checkpoint.save(r + 1)
            last = entry
        writer.flush()
        summary = {"rounds": f.rounds, "seconds": round(time.perf_counter() - wall, 1),
                   "checkpoint": self.checkpoint.latest, **(last or {})}  # fmt: skip
        self.run.metrics.write(event="summary", **summary)
        return summary

    def _round_entry(self, r, sampled, results, answered, info, rate, started) -> dict:
        losses = {str(x["client"]): x["loss"] for x in results}
        size = sum(w.nbytes for w in self.weights)
        received = info.get("masked_bytes") or sum(
            sum(u.nbytes for u in x["update"]) for x in results
        )
        entry = {
            "step": r + 1,
            "round": r + 1,
            "clients": sampled,
            "answered": answered,
            "client_losses": losses,
            "loss": float(np.mean(list(losses.values()))) if losses else math.nan,
            "worst_client": max(losses, key=losses.get) if losses else None,
            "worst_client_loss": max(losses.values()) if losses else math.nan,
            "bytes_sent": size * len(sampled),
            "bytes_received": int(received),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if self.dp.enabled:
            entry.update(epsilon(self.dp, rate, r + 1))
            entry["clipped_fraction"] = info.get("clipped_fraction")
        return entry

    def _write(self, entry: dict, writer) -> None:
        self.run.metrics.write(**entry)
        with writer.as_default(step=entry["round"]):
            for key in ("loss", "worst_client_loss", "val_loss", "bytes_sent",
                        "bytes_received", "epsilon"):  # fmt: skip
                if key in entry and entry[key] is not None and math.isfinite(entry[key]):
                    tf.summary.scalar(f"federated/{key}", entry[key])
        parts = [f"round {entry['round']}: client loss {entry['loss']:.4f}"]
        if "val_loss" in entry:
            parts.append(f"val loss {entry['val_loss']:.4f}")
        if "epsilon" in entry:
            parts.append(f"epsilon {entry['epsilon']:.2f}")
        self.log(", ".join(parts))
