"""Federated defaults that work and runs that stop when they fail (issue 23): clients per
round follows a small client count, FedAdam/FedYogi get a server learning rate of their
own, a diverging run is stopped, and `--engine flower` without Flower is one line."""

import math
import sys

import numpy as np
import pytest

from deepseek_tf.config.loader import apply_overrides, load_config, update_config
from deepseek_tf.config.validation import clients_per_round
from deepseek_tf.data.corpus import default_corpus_path, read_texts
from deepseek_tf.errors import ConfigError, TrainingError
from deepseek_tf.federated import require_flower
from deepseek_tf.federated.engine import FederatedRun, divergence, prepare_clients
from deepseek_tf.federated.rounds import sample_clients
from deepseek_tf.federated.server_optimizer import ServerOptimizer
from deepseek_tf.rundir import RunDir
from deepseek_tf.tokenizers.char import CharTokenizer


# -- clients per round ----------------------------------------------------------------------
def test_the_readme_flower_command_validates_and_asks_every_client():
    """`federated --preset tiny --clients 4 --rounds 5 --engine flower` once failed: the
    default 8 clients a round exceeded the 4 clients."""
    flags = ["federated.clients=4", "federated.rounds=5", "federated.engine=flower"]
    f = apply_overrides(load_config("tiny"), flags).federated
    assert clients_per_round(f) == 4
    assert sample_clients(f.clients, clients_per_round(f), 0, 0, poisson=False) == [0, 1, 2, 3]
    assert clients_per_round(update_config(load_config("tiny"), federated={"clients": 16})
                             .federated) == 8  # fmt: skip
    assert clients_per_round(load_config("tiny").federated) == 8  # 16 clients by default


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"clients": 4, "clients_per_round": 5}, "federated.clients_per_round: 5 is more than"),
        ({"clients": 4, "min_clients": 5}, "federated.min_clients: 5 exceeds the 4 clients"),
        ({"clients": 4, "clients_per_round": -1}, "federated.clients_per_round: must be >= 0"),
    ],
)
def test_an_impossible_clients_per_round_is_a_one_line_error(changes, match):
    with pytest.raises(ConfigError) as error:
        update_config(load_config("tiny"), federated=changes)
    assert match in str(error.value) and "\n" not in str(error.value)


# -- server learning rates --------------------------------------------------------------------
def _server(algorithm, config=None):
    f = (config or load_config("tiny")).federated
    shapes = [(64, 32), (32,)]
    return ServerOptimizer(algorithm, f.server_learning_rate, f.server_beta1, f.server_beta2,
                           f.server_tau, shapes)  # fmt: skip


def test_each_algorithm_gets_its_own_default_server_learning_rate():
    assert _server("fedavg").learning_rate == 1.0  # plain averaging
    assert _server("fedprox").learning_rate == 1.0
    assert _server("fedadam").learning_rate == 0.01  # Reddi et al.'s range, tau 1e-3
    assert _server("fedyogi").learning_rate == 0.01
    explicit = update_config(load_config("tiny"), federated={"server_learning_rate": 0.05})
    assert _server("fedadam", explicit).learning_rate == 0.05


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi"])
def test_the_default_adaptive_step_is_small_beside_the_weights(algorithm):
    """FedAdam's first step moves every coordinate by about the server learning rate,
    whatever the update's size: at 1 (once the default) each weight of a model initialised
    at ~0.02 moved by ~1 a round, and the loss went from 3.96 to 17."""
    server = _server(algorithm)
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.02, (64, 32)).astype(np.float32), np.zeros(32, np.float32)]
    delta = [rng.normal(0, 1e-3, w.shape).astype(np.float32) for w in weights]
    moved = [np.abs(a - b).max() for a, b in zip(server.apply(weights, delta), weights)]
    assert max(moved) <= 0.011


# -- divergence ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights,entry,reason",
    [
        ([0.0], {"client_losses": {"0": 3.9, "1": 4.3}, "val_loss": 4.1}, None),
        ([0.0], {"client_losses": {"0": 17.0, "1": 16.0}}, "client loss 16.5 > 1.5 x"),
        ([0.0], {"client_losses": {"0": 3.9}, "val_loss": 12.9}, "val loss 12.9 > 1.5 x"),
        ([0.0], {"client_losses": {"0": math.nan, "1": 4.0}}, None),  # one client rejected
        ([0.0], {"client_losses": {"0": math.nan}}, "every client's loss is not finite"),
        ([0.0], {"client_losses": {}, "val_loss": math.inf}, "validation loss is not finite"),
        ([math.nan], {"client_losses": {"0": 4.0}}, "global weights are not finite"),
    ],
)
def test_divergence_names_why_a_run_exploded(weights, entry, reason):
    got = divergence([np.array(weights, np.float32)], entry, 4.0)
    assert got is None if reason is None else reason in got


def test_no_reference_yet_only_checks_finiteness():
    assert divergence([np.zeros(2, np.float32)], {"client_losses": {"0": 99.0}}, None) is None


# -- Flower not installed ---------------------------------------------------------------------
@pytest.fixture
def no_flower(monkeypatch):
    # `import flwr` (and of any submodule already imported) fails as if not installed
    for name in ["flwr", *(m for m in sys.modules if m.startswith("flwr."))]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "deepseek_tf.federated.flower_app", raising=False)


def test_require_flower_is_one_line_with_the_install_hint(no_flower):
    with pytest.raises(ConfigError) as error:
        require_flower()
    message = str(error.value)
    assert "\n" not in message and "federated.engine=flower" in message
    assert "pip install 'deepseek-tf[federated]'" in message
    assert 'pip install -e ".[federated]"' in message
    with pytest.raises(ConfigError, match="pip install"):
        import deepseek_tf.federated.flower_app  # noqa: F401


def test_the_flower_engine_without_flower_writes_nothing(no_flower, tmp_path):
    config = update_config(load_config("tiny"), federated={"clients": 2, "engine": "flower"})
    run = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"pip install 'deepseek-tf\[federated\]'"):
        prepare_clients(config, run, resume=False)
    assert not run.path.exists()


# -- end to end (real rounds) -----------------------------------------------------------------
def _federated(tmp_path, **federated):
    """A tiny model's federated run on the first 40,000 characters of the bundled corpus,
    through the engine itself (what `deepseek-tf federated` runs in-process)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(read_texts([default_corpus_path()])[0][:40_000], encoding="utf-8")
    config = update_config(
        load_config("tiny"),
        data={"files": [str(corpus)]},
        federated={"clients": 2, "local_steps": 2, "partition": "iid", **federated},
    )
    tokenizer = CharTokenizer.train([corpus.read_text(encoding="utf-8")])
    config = update_config(config, model={"vocab_size": tokenizer.vocab_size})
    run = RunDir(tmp_path / "run")
    clients = prepare_clients(config, run, resume=False)
    return FederatedRun(config, run.path, tokenizer, clients, log=lambda *_: None), run


def _rounds(run):
    return [e for e in run.metrics.read() if "round" in e and "event" not in e]


@pytest.mark.slow  # ~1 min on 2 cores: runs in .ci/run under -m slow
def test_fedadam_with_its_defaults_learns(tmp_path):
    fed, run = _federated(tmp_path, algorithm="fedadam", rounds=4, eval_every=2)
    summary = fed.train()
    rounds = _rounds(run)
    first = rounds[0]["loss"]  # the initial model's, about ln(vocab)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and summary["rounds"] == 4
    assert rounds[-1]["loss"] < first and rounds[-1]["val_loss"] < 0.95 * first
    assert not any("diverged" in r for r in rounds)


@pytest.mark.slow  # ~30 s on 2 cores: runs in .ci/run under -m slow
def test_a_diverging_run_stops_before_saving_the_round(tmp_path):
    fed, run = _federated(tmp_path, algorithm="fedadam", server_learning_rate=100.0,
                          rounds=3, eval_every=1)  # fmt: skip
    with pytest.raises(TrainingError) as error:
        fed.train()
    message = str(error.value)
    assert "diverged in round 1" in message and "\n" not in message
    assert "federated.server_learning_rate (now 100)" in message
    rounds = _rounds(run)
    assert len(rounds) == 1 and "val loss" in rounds[0]["diverged"]
    assert not run.has_checkpoints()  # the diverged round was not saved
