"""The Python API: typed keywords, the command line's checks and one-line errors, and the
results the commands print (the commands themselves are tests/cli's)."""

import json
import sys
import urllib.request

import pytest

import deepseek_tf as ds
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import load_config
from deepseek_tf.errors import ConfigError, DataError, InputError, RunDirError
from deepseek_tf.rundir import RunDir
from deepseek_tf.tokenizers import load_tokenizer

QUICK = ["train.steps=2", "train.eval_every=0", "train.checkpoint_every=2"]


def test_every_exported_name_resolves_and_verbs_win_over_subpackages():
    import deepseek_tf.export.savedmodel  # noqa: F401 - binds nothing over the verb
    import deepseek_tf.federated.engine  # noqa: F401

    assert callable(ds.export) and callable(ds.federated) and callable(ds.compress.quantize)
    assert ds.federated.__module__ == "deepseek_tf.api.training"
    missing = [name for name in ds.__all__ if getattr(ds, name, None) is None]
    assert not missing
    import deepseek_tf.api as api

    assert all(getattr(ds, name) is getattr(api, name) for name in api.__all__)


# -- train --------------------------------------------------------------------------------------
def test_train_returns_the_summary_and_a_sample(tmp_path):
    summary = ds.train(preset="tiny", out=tmp_path / "run", overrides=QUICK, sample_tokens=6,
                       verbose=0)  # fmt: skip
    assert summary["step"] == 2 and summary["run_dir"] == str(tmp_path / "run")
    assert summary["sample"].startswith("\n") and len(summary["sample"]) == 7
    assert summary["sample_note"] is None and summary["example_prompt"] == "ROMEO:"
    assert RunDir(tmp_path / "run").read_config().train.steps == 2


def test_train_takes_a_config_object_a_file_or_a_preset(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("preset: tiny\ntrain:\n  steps: 1\n  eval_every: 0\n")
    summary = ds.train(str(config_file), out=tmp_path / "a", sample_tokens=0, verbose=0)
    assert summary["step"] == 1
    config = load_config("tiny", overrides=["train.steps=1", "train.eval_every=0"])
    summary = ds.train(config, out=tmp_path / "b", batch_size=2, sample_tokens=0, verbose=0)
    assert RunDir(tmp_path / "b").read_config().train.batch_size == 2
    with pytest.raises(ConfigError, match="--preset or --config, not both"):
        ds.train(config, preset="tiny", out=tmp_path / "c")


def _cpu_allocator_stats() -> bool:
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:  # e.g. TensorFlow's default CPU allocator without TF_CPU_ALLOCATOR_USE_BFC
        return False
    return True


@pytest.mark.skipif(not _cpu_allocator_stats(), reason="TensorFlow reports no CPU memory stats")
def test_train_measures_the_batch_size(tmp_path, capsys):
    """`batch_size="auto"`: the largest batch whose step fits the budget is measured,
    said, and trained with (moved here from the command line)."""
    summary = ds.train(preset="tiny", out=tmp_path / "run", overrides=["train.steps=1",
                       "train.eval_every=0"], batch_size="auto", memory_budget=64.0,
                       sample_tokens=0)  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if line.startswith("[batch-size auto]") and "global" in line]
    batch = RunDir(tmp_path / "run").read_config().train.batch_size
    assert summary["step"] == 1 and len(said) == 1 and f"global batch {batch} " in said[0]
    assert batch != load_config("tiny").train.batch_size


OUT = "{tmp}/out"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"resume": True}, ConfigError, "--resume needs --out"),
        ({"resume": True, "out": "{tmp}/none"}, RunDirError, "none does not exist"),
        ({"resume": True, "out": OUT, "preset": "tiny"}, ConfigError, "own config"),
        ({"resume": True, "init_from": "{tmp}", "out": OUT}, ConfigError, "pick one"),
        ({"init_from": "{tmp}"}, ConfigError, "--init-from needs --out"),
        ({"batch_size": "many"}, ConfigError, "--batch-size: a positive integer or 'auto'"),
        ({"batch_size": 0}, ConfigError, "--batch-size"),
        ({"memory_budget": 64.0}, ConfigError, "--memory-budget is the budget of"),
        ({"sample_tokens": -1}, ConfigError, "--sample-tokens"),
        ({"data": []}, ConfigError, "--data: give at least one"),
        ({"data": ["{tmp}/missing.txt"]}, DataError, "missing.txt' does not exist"),
        ({"config": "{tmp}/empty.yaml", "out": OUT}, ConfigError, "is empty"),
        ({"overrides": ["train.stepz=3"]}, ConfigError, "train.stepz"),
    ],
)
def test_train_refuses_bad_options_before_writing(tmp_path, kwargs, error, match):
    (tmp_path / "empty.yaml").write_text("# nothing\n")

    def fill(value):
        if isinstance(value, str):
            return value.format(tmp=tmp_path)
        return [fill(v) for v in value] if isinstance(value, list) else value

    kwargs = {k: fill(v) for k, v in kwargs.items()}
    if not ({"resume", "init_from", "config"} & set(kwargs)):
        kwargs = {"preset": "tiny", "out": fill(OUT), **kwargs}
    with pytest.raises(error, match=match):
        ds.train(**kwargs)
    assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


def test_train_on_data_files(tmp_path):
    """`data` is what is trained on: its characters (not in the bundled corpus) are the
    run's vocabulary."""
    text = tmp_path / "notes.txt"
    text.write_text("\u00e6\u00f8\u00e5 \u03bb\u03bc\n" * 300, encoding="utf-8")
    summary = ds.train(preset="tiny", out=tmp_path / "run", data=str(text), overrides=QUICK,
                       sample_tokens=0, verbose=0)  # fmt: skip
    assert load_tokenizer(tmp_path / "run").vocab_size == len(
        set("\u00e6\u00f8\u00e5 \u03bb\u03bc\n")
    )
    assert summary["example_prompt"] == "Once upon a time"


# -- federated ----------------------------------------------------------------------------------
def test_federated_prepare_only_maps_the_flags_onto_the_config(tmp_path):
    result = ds.federated(preset="tiny", out=tmp_path / "fed", prepare_only=True, clients=3,
                          clients_per_round=2, partition="iid", rounds=2, local_steps=1,
                          secure_aggregation=True, verbose=0)  # fmt: skip
    assert result == {"rounds": 0, "clients": 3, "run_dir": str((tmp_path / "fed").resolve())}
    f = RunDir(tmp_path / "fed").read_config().federated
    assert (f.clients, f.clients_per_round, f.partition, f.rounds) == (3, 2, "iid", 2)
    assert f.secure_aggregation and f.engine == "inprocess"
    assert load_tokenizer(tmp_path / "fed").vocab_size == 65


def test_federated_refuses_before_writing(tmp_path, monkeypatch):
    out = tmp_path / "fed"
    with pytest.raises(ConfigError, match="federated.clients_per_round: 8 is more than the 4"):
        ds.federated(preset="tiny", out=out, clients=4, clients_per_round=8)
    with pytest.raises(ConfigError, match="train.ema_decay"):
        ds.federated(preset="tiny", out=out, overrides=["train.ema_decay=0.9"])
    monkeypatch.setitem(sys.modules, "flwr", None)  # Flower not installed
    monkeypatch.delitem(sys.modules, "deepseek_tf.federated.flower_app", raising=False)
    with pytest.raises(ConfigError, match=r"needs Flower.*pip install 'deepseek-tf\[federated\]'"):
        ds.federated(preset="tiny", out=out, clients=4, engine="flower")
    with pytest.raises(RunDirError, match="does not exist"):
        ds.federated(out=out, resume=True)
    assert not out.exists()


# -- data, tokenizers, info, load ---------------------------------------------------------------
def test_train_tokenizer(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello tensorflow\n" * 50, encoding="utf-8")
    char = ds.train_tokenizer(out=tmp_path / "char", files=[str(corpus)])
    assert char["kind"] == "char" and char["vocab_size"] == len(set(corpus.read_text()))
    assert char["files"] == [str(corpus)] and char["note"] is None
    bpe = ds.train_tokenizer(out=tmp_path / "bpe", files=[str(corpus)], kind="bpe",
                             vocab_size=4096)  # fmt: skip
    assert bpe["vocab_size"] < 4096 and "fewer than --vocab-size 4096" in bpe["note"]
    assert load_tokenizer(tmp_path / "bpe").vocab_size == bpe["vocab_size"]
    with pytest.raises(InputError, match="is an existing file"):
        ds.train_tokenizer(out=corpus)
    with pytest.raises(InputError, match="--kind"):
        ds.train_tokenizer(out=tmp_path / "x", kind="wordpiece")
    for bad in (0, True, 2.5):
        with pytest.raises(InputError, match=r"--vocab-size: must be >= 1, got"):
            ds.train_tokenizer(out=tmp_path / "x", files=[str(corpus)], kind="bpe", vocab_size=bad)
    assert not (tmp_path / "x").exists()


def test_prepare_data(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(2000)))
    manifest = ds.prepare_data([str(corpus)], out=tmp_path / "prep", record_tokens=512,
                               val_fraction=0.2, verbose=0)  # fmt: skip
    assert manifest["out"] == str(tmp_path / "prep") and manifest["tokenizer"] == "char"
    assert manifest["splits"]["train"]["tokens"] > 0 and manifest["splits"]["val"]["tokens"] > 0
    with pytest.raises(InputError, match="already exists"):
        ds.prepare_data(str(corpus), out=tmp_path / "prep", verbose=0)
    with pytest.raises(InputError, match="--on-bad-record"):
        ds.prepare_data(str(corpus), out=tmp_path / "p2", on_bad_record="ignore")


def test_info(trained_run):
    assert ds.info(preset="tiny")["parameters"]["total"] == 23840
    assert ds.info(preset="deepseek-v3")["parameters"]["total"] == 671_026_419_200
    presets = ds.info(presets=True)["presets"]
    assert "shakespeare-char" in presets and all(len(d) > 20 for d in presets.values())
    run = ds.info(trained_run)
    assert run["training"]["step"] == run["training"]["steps"] == 20
    assert run["training"]["best_val_loss"] > 0 and run["compression"] == []
    assert run["config"]["model"]["d_model"] == 32 and run["vocab_size"] == 65
    with pytest.raises(ConfigError, match="not both"):
        ds.info(trained_run, preset="tiny")


def test_load(trained_run):
    model, tokenizer = ds.load(trained_run)
    assert model([tokenizer.encode("ROMEO:")]).shape == (1, 6, 65)


# -- the other verbs give what their commands print ----------------------------------------------
def test_evaluate_equals_the_eval_command(trained_run, capsys):
    assert main(["eval", str(trained_run), "--max-batches", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = ds.evaluate(trained_run, max_batches=2)
    assert result["loss"] == pytest.approx(printed["loss"], rel=1e-6)
    assert result["tokens"] == printed["tokens"]


def test_generate_equals_the_generate_command(trained_run, capsys):
    argv = ["generate", str(trained_run), "--prompt", "ab", "--max-new-tokens", "12"]
    assert main([*argv, "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    # a batch's rows decode as each would alone: its first is the command's reply
    two = ds.generate(trained_run, ["ab", "cd"], max_new_tokens=12, temperature=0.0)
    assert printed.endswith(two[0] + "\n") and len(two[0]) > 2
    assert len(two) == 2 and two[0].startswith("ab") and two[1].startswith("cd")


def test_options_are_typed_keywords_checked_like_the_command_line(trained_run):
    with pytest.raises(TypeError, match="max_tokens"):
        ds.generate(trained_run, "ab", max_tokens=3)
    with pytest.raises(InputError, match="--top-p"):
        ds.generate(trained_run, "ab", top_p=2.0)


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_export_writes_a_verified_savedmodel(trained_run, tmp_path):
    report = ds.export(trained_run, format="savedmodel", out=tmp_path / "sm")
    assert (tmp_path / "sm" / "saved_model.pb").exists()
    assert {"serving_default", "generate"} <= set(report["signatures"])
    with pytest.raises(InputError, match="already exists"):
        ds.export(trained_run, format="savedmodel", out=tmp_path / "sm")


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_compress_quantize_into_a_new_run(trained_run, tmp_path):
    record = ds.compress.quantize(trained_run, out=tmp_path / "q", mode="int8", quiet=True)
    assert record["method"] == "quantize"
    assert RunDir(tmp_path / "q").read_config().compression.quantize == "int8"
    assert ds.evaluate(tmp_path / "q", max_batches=1)["loss"] > 0


def test_serve_answers_on_loopback_and_closes(trained_run):
    with ds.serve(trained_run, port=0, warm_up=False) as served:
        assert served.url.startswith("http://127.0.0.1:")
        assert served.wait_ready(60)
        body = json.dumps({"prompt": "ab", "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(f"{served.url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        assert reply["usage"]["completion_tokens"] == 3
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{served.url}/health", timeout=5)
