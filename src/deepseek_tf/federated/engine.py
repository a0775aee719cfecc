"""`deepseek-tf federated`: rounds of client training and server aggregation, as a run.

The run directory is an ordinary run (`config.yaml` with its `federated` section, the
tokenizer, `checkpoints/` of the global model, `metrics.jsonl`, `logs/`) plus `clients/`
(the partitioned data). Each round's checkpoint holds the global weights, the server
optimizer's moments and the round number, so `--resume` continues from the last
completed round (client sampling and local data positions depend only on the seed and
the round). `eval`, `generate`, `export`, `serve` and `compress` take the run like any
other.

A run that diverges stops instead of reporting success: global weights or every client's
loss not finite, or a client or validation loss above 1.5 times round 1's (the initial
model's) is a one-line `TrainingError`, raised before that round's checkpoint is saved.

Engines: `inprocess` (pure TensorFlow, one process: every sampled client is trained in
turn on one model) and `flower` (the same client and server code through Flower's
`ServerApp`/`ClientApp`, see `federated.flower_app`).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import tensorflow as tf

from deepseek_tf.config.loader import update_config
from deepseek_tf.config.validation import clients_per_round
from deepseek_tf.data.pipeline import make_eval_dataset
from deepseek_tf.errors import TrainingError
from deepseek_tf.federated import require_flower
from deepseek_tf.federated.client import LocalTrainer
from deepseek_tf.federated.partition import Client, partition
from deepseek_tf.federated.privacy import check_dp, epsilon
from deepseek_tf.federated.rounds import aggregate, sample_clients
from deepseek_tf.federated.server_optimizer import ServerOptimizer, parse_algorithm
from deepseek_tf.rundir import RunDir
from deepseek_tf.training.evaluate import evaluate

CLIENTS_DIR = "clients"
CLIENTS_FILE = "clients.json"
DIVERGED = 1.5  # a loss above this many times round 1's client loss stops the run


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
    """The partition of a new run (written to `clients/`), or a resumed run's own. The
    Flower engine without Flower installed is refused first (nothing is written)."""
    f = config.federated
    if f.engine == "flower":  # Flower's apps read the run: refuse before writing it
        require_flower(simulation=False)
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
        data = update_config(self.config, data={"files": [c.path for c in self.clients]}).data
        ds = make_eval_dataset(data, self.tokenizer, self.config.train.batch_size, split="val")
        return evaluate(self.trainer.model, ds, jit_compile=self.config.runtime.jit_compile)["loss"]

    def train(self) -> dict:
        """Runs the rounds left; returns the last round's entry with `rounds`, `seconds` and
        `checkpoint`. A run whose loss explodes (see `divergence`) stops with a one-line
        `TrainingError` before saving that round; earlier rounds' checkpoints stay."""
        f = self.config.federated
        self._open_run()
        writer = tf.summary.create_file_writer(str(self.run.logs_dir))
        reference = self._reference_loss()
        wall, last = time.perf_counter(), None
        for r in range(self.start_round, f.rounds):
            entry = self._round(r)
            if (f.eval_every and (r + 1) % f.eval_every == 0) or r + 1 == f.rounds:
                entry["val_loss"] = self.validation_loss()
            if reference is None:  # round 1: the clients' loss from the initial model
                reference = _finite_mean(entry["client_losses"].values())
            problem = divergence(self.weights, entry, reference)
            if problem:
                entry["diverged"] = problem
            self._write(entry, writer)
            if problem:
                writer.flush()
                raise TrainingError(
                    f"federated: the run diverged in round {r + 1} ({problem}); stopped "
                    f"without saving it (last checkpoint: {self.checkpoint.latest or 'none'}). "
                    f"Lower federated.server_learning_rate (now {self.server.learning_rate:g}) "
                    "or train.learning_rate"
                )
            self.trainer.set_weights(self.weights)
            self.state.store()
            self.checkpoint.save(r + 1)
            last = entry
        writer.flush()
        summary = {"rounds": f.rounds, "seconds": round(time.perf_counter() - wall, 1),
                   "checkpoint": self.checkpoint.latest, **(last or {})}  # fmt: skip
        self.run.metrics.write(event="summary", **summary)
        return summary

    def _open_run(self) -> None:
        f = self.config.federated
        if self.start_round == 0:
            self.run.write_config(self.config)
            self.run.write_tokenizer(self.tokenizer)
        else:  # restored: drop later metrics, keep a changed config (e.g. more rounds)
            self.run.metrics.truncate_after(self.start_round)
            if self.run.read_config() != self.config:
                self.run.write_config(self.config)
        default = " (the algorithm's default)" if not f.server_learning_rate else ""
        self.log(f"[federated] {f.algorithm}: {clients_per_round(f)} of {f.clients} clients a "
                 f"round, server learning rate {self.server.learning_rate:g}{default}")  # fmt: skip

    def _round(self, r: int) -> dict:
        """One round: sample, train the clients, aggregate, update the global weights."""
        f = self.config.federated
        started, per_round = time.perf_counter(), clients_per_round(f)
        sampled = sample_clients(f.clients, per_round, r, self.config.train.seed,
                                 poisson=self.dp.enabled)  # fmt: skip
        results = self._run_clients(sampled, r)
        rng = np.random.default_rng([self.config.train.seed, 7, r])  # DP noise, per round
        answered = len(results)
        delta, info = aggregate(
            results, self.weights, dp=self.dp, expected_clients=per_round,
            secure=f.secure_aggregation, frac_bits=f.secagg_frac_bits,
            threshold=f.secagg_threshold, round_index=r, rng=rng, log=self.log,
        )  # fmt: skip
        usable = len(info["accepted"]) >= min(f.min_clients, max(len(sampled), 1))
        if delta is not None and usable:
            self.weights = self.server.apply(self.weights, delta)
        else:
            self.log(f"[federated] round {r + 1}: {len(info['accepted'])} usable updates of "
                     f"{len(sampled)} asked; the global model is unchanged")  # fmt: skip
        rate = per_round / f.clients
        return self._round_entry(r, sampled, results, answered, info, rate, started)

    def _reference_loss(self) -> float | None:
        """Round 1's mean client loss (None before round 1 has run; a resumed run reads it
        from its metrics)."""
        for entry in self.run.metrics.read() if self.start_round else []:
            if entry.get("round") == 1 and "event" not in entry:
                return _finite_mean(entry.get("client_losses", {}).values())
        return None

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


def _finite_mean(values) -> float | None:
    """The mean of the finite values (None when there are none)."""
    finite = [float(x) for x in values if math.isfinite(x)]
    return float(np.mean(finite)) if finite else None


def divergence(weights: list[np.ndarray], entry: dict, reference: float | None) -> str | None:
    """Why a run has diverged after a round, or None.

    Args:
        weights: the global weights after the round.
        entry: the round's metrics (`client_losses`, and `val_loss` when evaluated).
        reference: round 1's mean client loss (the initial model's, about ln(vocab)).

    Returns:
        A short reason: global weights or every client's loss not finite, a validation
        loss not finite, or a mean client / validation loss above `DIVERGED` times
        `reference`; None for a healthy round.

    Examples:

    >>> w = [np.zeros(3, np.float32)]
    >>> divergence(w, {"client_losses": {"0": 3.9, "1": 4.1}}, 4.2) is None
    True
    >>> divergence(w, {"client_losses": {"0": 17.0}, "val_loss": 12.9}, 4.0)
    "client loss 17 > 1.5 x round 1's client loss 4"
    """
    if not all(np.all(np.isfinite(w)) for w in weights):
        return "the global weights are not finite"
    losses = list(entry["client_losses"].values())
    if losses and not any(math.isfinite(x) for x in losses):
        return "every client's loss is not finite"
    val = entry.get("val_loss")
    if val is not None and not math.isfinite(val):
        return "the validation loss is not finite"
    if reference is None or not math.isfinite(reference):
        return None
    for name, value in (("client loss", _finite_mean(losses)), ("val loss", val)):
        if value is not None and value > DIVERGED * reference:
            return f"{name} {value:.4g} > {DIVERGED:g} x round 1's client loss {reference:.4g}"
    return None
