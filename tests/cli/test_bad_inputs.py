"""The reliability campaign's bad CLI inputs: each is one line `error: ...` naming the
problem and exit code 2 -- never a traceback, never a silently wrong run."""

import os
import shutil
import socket
import sys

import pytest

from deepseek_tf.cli.main import main

TRAIN = ["train", "--preset", "tiny", "--sample-tokens", "0"]


def one_line_error(capsys, args, match):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err + out


@pytest.fixture()
def files(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe" * 10)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("model:\n  d_model: caf\xe9\n".encode("latin-1"))
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 20000 + "]" * 20000)
    dupes = tmp_path / "dupes.yaml"
    dupes.write_text("preset: tiny\ntrain:\n  steps: 3\n  steps: 4\n")
    existing = tmp_path / "existing.txt"
    existing.write_text("not a run")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {
        "binary": binary,
        "latin": latin,
        "deep": deep,
        "dupes": dupes,
        "existing": existing,
        "fifo": fifo,
        "empty": empty,
        "out": tmp_path / "out",
        "empty_dir": tmp_path,
    }


CASES = [
    (["--config", "{binary}"], "is not UTF-8 text"),
    (["--config", "{latin}"], "is not UTF-8 text"),
    (["--config", "{deep}"], "nested too deeply"),
    (["--config", "{dupes}"], "'steps' is given twice (line 4)"),
    (["--config", "{empty}"], "is empty"),  # was: silently the schema's defaults
    (["--set", "train.steps=" + "9" * 5000], "unreadable value"),
    (["--set", "runtime.strategy=tpu"], "runtime.strategy=tpu: no TPU"),
    (["--set", "runtime.devices=[banana]"], "runtime.devices[0]: 'banana' is not a device name"),
    (["--set", "runtime.devices=[/gpu:7]"], "'/gpu:7' is not on this machine"),
    (["--set", "model.d_model=1000000000"], "model.d_model=1000000000"),
    (["--set", "model.n_layers=100000"], "more than this machine's"),
    (["--set", "train.batch_size=1000000000"], "train.batch_size=1000000000"),
    (["--set", "model.vocab_size=2000000000"], "more than this machine's"),
    (["--set", "model.max_seq_len=2000000000"], "model.max_seq_len=2000000000"),
    (["--set", "data.files=[/dev/zero]"], "'/dev/zero' is not a regular file"),
    (["--set", "data.files=[{fifo}]"], "is not a regular file"),
    (["--set", "model.vocab_size=1"], "model.vocab_size: 1 is smaller than the tokenizer's 65"),
    (["--set", "data.seq_len=0"], "data.seq_len: must be > 0"),
    (["--set", "model.kv_lora_rank=8"], "only read with model.attention: mla"),
    (["--set", "train.keep_best=true", "--set", "train.eval_every=0"], "train.keep_best: "),
]


@pytest.mark.parametrize("extra,match", CASES, ids=[m[:30] for _, m in CASES])
def test_train(capsys, files, extra, match):
    extra = [a.format(**files) for a in extra]
    base = ["train", "--sample-tokens", "0"] if "--config" in extra else TRAIN
    one_line_error(capsys, [*base, "--out", files["out"], *extra], match)
    assert not files["out"].exists()  # refused before anything was written


def test_train_out_and_resume(capsys, files):
    one_line_error(capsys, [*TRAIN, "--out", files["existing"]], "is an existing file")
    one_line_error(capsys, ["train", "--out", files["empty_dir"], "--resume"], "no config.yaml")
    missing = files["empty_dir"] / "no-such-run"
    one_line_error(capsys, ["train", "--out", missing, "--resume"], f"{missing} does not exist")
    assert not missing.exists()
    one_line_error(capsys, [*TRAIN, "--out", files["out"], "--batch-size", "0"], "--batch-size")
    one_line_error(capsys, [*TRAIN, "--out", files["out"], "--memory-budget", "64"], "auto")
    assert not files["out"].exists()
    globbed = files["empty_dir"] / "run[1]"  # trained, it could never be loaded
    one_line_error(capsys, [*TRAIN, "--out", globbed], "cannot contain any of [ ] * ?")
    assert not globbed.exists()


FEDERATED = ["federated", "--preset", "tiny", "--rounds", "1", "--local-steps", "1"]


def test_federated_more_clients_per_round_than_clients(capsys, files):
    """The README's Flower command once failed with a traceback-free but puzzling error:
    4 clients and (then the default) 8 a round. Asked for explicitly, it names the key and
    the flag that fixes it."""
    one_line_error(
        capsys, [*FEDERATED, "--clients", "4", "--clients-per-round", "8", "--out", files["out"]],
        "federated.clients_per_round: 8 is more than the 4 clients; pass --clients-per-round",
    )  # fmt: skip
    assert not files["out"].exists()


def test_flower_engine_without_flower_installed(capsys, files, monkeypatch):
    """One line with the install hint, and no half-written run directory."""
    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` fails as if not installed
    monkeypatch.delitem(sys.modules, "deepseek_tf.federated.flower_app", raising=False)
    argv = [*FEDERATED, "--clients", "4", "--clients-per-round", "2", "--engine", "flower"]
    one_line_error(capsys, [*argv, "--out", files["out"]], "pip install 'deepseek-tf[federated]'")
    assert not files["out"].exists()


def test_tokenizer_train_out_is_an_existing_file(capsys, files):
    argv = ["tokenizer", "train", "--out", files["existing"]]
    one_line_error(capsys, argv, "is an existing file")


@pytest.fixture(scope="module")
def no_tokenizer(trained_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("notok") / "run"
    shutil.copytree(trained_run, run)
    (run / "char_tokenizer.json").unlink()
    return run


def test_eval(capsys, trained_run, no_tokenizer):
    one_line_error(capsys, ["eval", trained_run, "--batch-size", "0"], "--batch-size")
    one_line_error(capsys, ["eval", trained_run, "--max-batches", "-1"], "--max-batches")
    one_line_error(capsys, ["eval", no_tokenizer], "has no tokenizer")


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--top-p", "-0.5"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-k", "-3"], "--top-k"),
        (["--max-new-tokens", "1000000000"], "--max-new-tokens"),
    ],
)
def test_generate(capsys, trained_run, extra, match):
    one_line_error(capsys, ["generate", trained_run, "--prompt", "A", *extra], match)


def test_generate_takes_any_integer_seed(capsys, trained_run):
    args = ["generate", trained_run, "--prompt", "A", "--max-new-tokens", "4"]
    assert main([str(a) for a in [*args, "--seed", str(10**30)]]) == 0
    assert capsys.readouterr().out.startswith("A")


def test_serve(capsys, trained_run):
    one_line_error(capsys, ["serve", trained_run, "--port", "70000"], "--port")
    one_line_error(capsys, ["serve", trained_run, "--chunk", "0"], "--chunk")
    one_line_error(capsys, ["serve", trained_run, "--max-queue", "-1"], "--max-queue")
    one_line_error(
        capsys, ["serve", trained_run, "--host", "no-such-host.invalid"], "cannot be resolved"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(capsys, ["serve", trained_run, "--port", port], "already in use")


def test_an_allocation_refused_is_one_line_naming_its_size(capsys, trained_run, monkeypatch):
    """What an evaluation of a model too large for the machine used to print: TensorFlow's
    `ResourceExhaustedError` as a 20-line traceback."""
    import tensorflow as tf

    import deepseek_tf.api.evaluation as evaluation

    def exhausted(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(
            None, None, "Out of memory while trying to allocate 57.72GiB. [Op:step]"
        )

    monkeypatch.setattr(evaluation, "evaluate", exhausted)
    one_line_error(capsys, ["eval", trained_run, "--max-batches", "1"], "allocate 57.72GiB")
