"""`--batch-size auto`: measured step memory picks the largest batch under a budget."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from deepseek_tf.errors import ConfigError
from deepseek_tf.training.autobatch import BFC_VARIABLE, MIB, _refit, check_memory_stats

VOCAB = 65
OVERRIDES = ["data.seq_len=48", "model.d_model=64"]


def _measured(code: str):
    """Runs `code` (which prints JSON) in a fresh interpreter with TensorFlow's BFC CPU
    allocator, whose statistics the measurement reads on any CPU (see `check_memory_stats`)."""
    env = {**os.environ, BFC_VARIABLE: "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    prelude = (
        "import json\n"
        "from deepseek_tf.config.loader import load_config\n"
        "from deepseek_tf.training.autobatch import MIB, find_batch_size, step_bytes\n"
        f"config = load_config('tiny', overrides={OVERRIDES!r})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured():
    """Step memory at two batches and the error of a budget below one sequence, measured
    in one fresh interpreter (one TensorFlow start-up for the module)."""
    code = (
        f"steps = [step_bytes(config, {VOCAB}, 8), step_bytes(config, {VOCAB}, 256)]\n"
        f"try:\n    find_batch_size(config, {VOCAB}, 1024, log=None)\n    error = None\n"
        "except Exception as e:\n    error = [type(e).__name__, str(e)]\n"
        "print(json.dumps({'steps': steps, 'error': error}))"
    )
    return _measured(code)


def test_step_memory_grows_with_the_batch(measured):
    small, large = measured["steps"]
    assert large > small > 0


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_auto_batch_fits_the_budget_and_grows_with_it():
    small, large = _measured(
        f"print(json.dumps([find_batch_size(config, {VOCAB}, b * MIB, log=None) "
        "for b in (24, 96)]))"
    )
    assert small["seq_len"] == 48
    assert small["confirmed_step_mib"] <= 24
    assert large["confirmed_step_mib"] <= 96
    assert large["batch_size"] > small["batch_size"] >= 2


def test_a_step_over_the_budget_is_refitted_through_the_largest_that_fit():
    """Probes of 2 and 8 sequences that differ by allocator rounding put the first try
    at the largest batch; the next is read off the line through it and 8, not halved."""
    fits, over, budget = (8, 1.0 * MIB), (4096, 386.0 * MIB), 64.0 * MIB
    per_seq = (over[1] - fits[1]) / (over[0] - fits[0])
    batch = _refit(fits, over, budget, replicas=1)
    assert fits[1] + (batch - fits[0]) * per_seq <= budget  # on the line, under the budget
    assert fits[1] + (batch + 1 - fits[0]) * per_seq > budget  # ... and the largest such
    assert _refit(fits, over, budget, replicas=4) % 4 == 0
    assert _refit(fits, (9, 70.0 * MIB), budget, replicas=1) == 8  # never below what fit
    assert _refit((0, 0.0), (16, 100.0 * MIB), 10.0 * MIB, replicas=2) == 2  # nor replicas


def test_a_budget_below_one_sequence_is_a_clear_error(measured):
    kind, message = measured["error"]
    assert kind == "ConfigError" and "batch-size auto" in message


def test_without_allocator_statistics_the_error_is_one_line():
    """This process started without the BFC allocator: where TensorFlow keeps no CPU
    statistics (AMD CPUs), measuring is a one-line error naming the variable to set."""
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        with pytest.raises(ConfigError, match=BFC_VARIABLE):
            check_memory_stats()
    else:
        check_memory_stats()  # statistics kept (an Intel CPU with oneDNN): no error


def test_cli_rejects_a_malformed_batch_size(tmp_path, capsys):
    from deepseek_tf.cli.main import main

    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--batch-size", "x"])
    assert code == 2
    assert "--batch-size" in capsys.readouterr().err
