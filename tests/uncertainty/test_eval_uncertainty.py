"""`eval --uncertainty`, `calibrate`, and TFP beside Keras 3, end to end on real runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deepseek_tf.api import train
from deepseek_tf.api.evaluation import calibrate, evaluate
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import InputError, RunDirError


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _error(capsys, args, match):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err


def test_eval_uncertainty_reports_and_plots(trained_run, tmp_path, capsys):
    args = ["eval", trained_run, "--max-batches", "4", "--uncertainty", "--plot", tmp_path]
    assert main([str(a) for a in args]) == 0
    result = _json(capsys)["uncertainty"]
    for key in ("nll", "ece", "brier", "entropy", "mutual_information", "aurc",
                "auroc_error_detection", "accuracy_at_50_coverage"):  # fmt: skip
        assert np.isfinite(result[key]), key
    assert 0 <= result["brier"] <= 2 and result["mutual_information"] == 0.0
    assert all(os.path.getsize(p) > 1000 for p in result["plots"])


def test_ood_data(trained_run, tmp_path, capsys):
    code = tmp_path / "code.py"
    code.write_text("def f(x):\n    return {k: [v for v in x] for k in range(3)}  # _\n" * 40)
    args = ["eval", trained_run, "--uncertainty", "--max-batches", "3", "--ood-data", code]
    _error(capsys, args, "is not in the char tokenizer's vocabulary")
    # the library: one file as a string, the same result as the command
    result = evaluate(trained_run, uncertainty=True, max_batches=3, ood_data=str(code),
                      drop_unknown=True)  # fmt: skip
    ood = result["uncertainty"]["ood"]
    assert ood["blocks_ood"] > 0 and 0 <= ood["auroc_nll"] <= 1
    assert main([str(a) for a in [*args, "--drop-unknown"]]) == 0
    assert _json(capsys)["uncertainty"]["ood"] == pytest.approx(ood)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mc_samples": 4}, "--mc-samples needs --uncertainty"),
        ({"ensemble": ["runs/other"]}, "--ensemble needs --uncertainty"),
        ({"plot": "plots"}, "--plot needs --uncertainty"),
        ({"ood_data": "other.txt"}, "--ood-data needs --uncertainty"),
        ({"batch_size": 0}, "--batch-size: must be >= 1, got 0"),
        ({"max_batches": -1}, r"--max-batches: must be >= 0 \(0: all\), got -1"),
        ({"uncertainty": True, "samples": 0}, "--samples: must be >= 1, got 0"),
        ({"uncertainty": True, "mc_samples": 0}, "--mc-samples: must be >= 1, got 0"),
    ],
)
def test_evaluate_checks_its_options_before_loading(tmp_path, options, match):
    # no run at all: each option is refused before anything is read
    with pytest.raises(InputError, match=match):
        evaluate(tmp_path / "nowhere", **options)


def test_calibrate_refuses_its_source_and_bad_samples(trained_run, tmp_path):
    with pytest.raises(RunDirError, match="is the source run"):
        calibrate(trained_run, out=trained_run)
    with pytest.raises(InputError, match="--samples: must be >= 1"):
        calibrate(trained_run, out=tmp_path / "new", samples=0)
    with pytest.raises(InputError, match=r"--max-batches: must be >= 0 \(0: all\), got -1"):
        calibrate(trained_run, out=tmp_path / "new", max_batches=-1)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_bad_uncertainty_requests(trained_run, tmp_path, capsys):
    _error(capsys, ["eval", trained_run, "--mc-samples", "4"], "needs --uncertainty")
    _error(capsys, ["eval", trained_run, "--uncertainty", "--mc-samples", "4"],
           "Monte Carlo dropout needs a model trained with dropout")  # fmt: skip
    _error(capsys, ["eval", trained_run, "--uncertainty", "--samples", "0"], "samples")
    bpe = apply_overrides(load_config("tiny"), ["data.tokenizer=bpe", "data.vocab_size=300",
                                                "train.steps=2", "train.eval_every=0"])  # fmt: skip
    train(bpe, out=tmp_path / "bpe", sample_tokens=0, verbose=0)
    capsys.readouterr()  # (what training said)
    _error(capsys, ["eval", trained_run, "--uncertainty", "--ensemble", tmp_path / "bpe"],
           "its tokenizer differs")  # fmt: skip


@pytest.fixture(scope="module")
def dropout_runs(tmp_path_factory):
    base = ["model.dropout=0.1", "train.steps=40", "train.eval_every=0"]
    runs = []
    for seed in (1, 2):
        config = apply_overrides(load_config("tiny"), [*base, f"train.seed={seed}"])
        run = tmp_path_factory.mktemp("drop") / f"run{seed}"
        train(config, out=run, sample_tokens=0, verbose=0)
        runs.append(run)
    return runs


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_mc_dropout_and_ensembles_have_epistemic_uncertainty(dropout_runs, capsys):
    first, second = dropout_runs
    base = ["eval", first, "--uncertainty", "--max-batches", "3"]
    assert main([str(a) for a in [*base, "--mc-samples", "4"]]) == 0
    mc = _json(capsys)["uncertainty"]
    assert mc["method"] == "mc_dropout" and mc["samples"] == 4 and mc["mutual_information"] > 0
    # the masks come from the seed, not from how many passes ran before
    assert main([str(a) for a in [*base, "--mc-samples", "4"]]) == 0
    assert _json(capsys)["uncertainty"]["nll"] == mc["nll"]
    assert main([str(a) for a in [*base, "--ensemble", second]]) == 0
    ensemble = _json(capsys)["uncertainty"]
    assert ensemble["samples"] == 2 and ensemble["mutual_information"] > 0


def test_temperature_scaling_lowers_held_out_nll(trained_run, tmp_path, capsys):
    out = tmp_path / "calibrated"
    args = ["calibrate", str(trained_run), "--out", str(out), "--max-batches", "64"]
    assert main(args) == 0
    record = _json(capsys)
    assert record["options"]["max_batches"] == 64
    assert record["fit_tokens"] + record["held_out_tokens"] == 64 * 4 * 16  # 64 batches of 4 x 16
    assert record["held_out_nll_after"] < record["held_out_nll_before"]
    assert record["temperature_factor"] != pytest.approx(1.0, abs=1e-3)
    assert main(["eval", str(out), "--uncertainty", "--max-batches", "2"]) == 0
    assert _json(capsys)["uncertainty"]["nll"] > 0
    assert main(["info", str(out)]) == 0
    assert '"method": "calibrate"' in capsys.readouterr().out


SCRIPT = r"""
import json, sys
import numpy as np
if sys.argv[1] == "tfp":
    import tensorflow_probability  # imports tf_keras
import keras, os, tensorflow as tf
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
x = np.random.RandomState(0).randn(64, 4).astype("float32")
model.fit(x, x.sum(1, keepdims=True), epochs=3, verbose=0, shuffle=False)
print(json.dumps({"keras": keras.__version__, "tf_keras": tf.keras.__version__,
                  "legacy": os.environ.get("TF_USE_LEGACY_KERAS"),
                  "weights": [w.tolist() for w in model.get_weights()]}))
"""


def test_importing_tfp_does_not_change_keras():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    runs = {}
    for mode in ("plain", "tfp"):
        done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                              text=True, env=env, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["tfp"]["keras"].startswith("3.") and runs["tfp"]["tf_keras"].startswith("3.")
    assert runs["tfp"]["legacy"] is None
    assert runs["tfp"]["weights"] == runs["plain"]["weights"]  # bit for bit
