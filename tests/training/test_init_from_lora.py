"""`train --init-from`: fine-tuning a run, fully or with LoRA adapters on a frozen base."""

import numpy as np
import pytest

from deepseek_tf.api import load, train
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.models.lora import lora_variables

STEPS = ["--set", "train.steps=4", "--set", "train.eval_every=0", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def source(shared_run):
    return shared_run("tiny-moe")  # read-only


def _base_weights(model):
    adapters = {id(v) for v in lora_variables(model)}
    return {v.path.split("/", 1)[1]: v.numpy() for v in model.weights if id(v) not in adapters}


def test_lora_trains_only_the_adapters(source, tmp_path, capsys):
    out = tmp_path / "lora"
    lora = ["--set", "train.lora_rank=4", "--set", "train.lora_targets=[attention,experts]"]
    assert main(["train", "--init-from", str(source), "--out", str(out), *STEPS, *lora]) == 0
    log = capsys.readouterr().out
    assert f"[init] weights from {source} (step {load_config('tiny-moe').train.steps})" in log
    assert "[lora] rank 4 on attention, experts:" in log
    before, _ = load(source)
    after, tokenizer = load(out)
    assert tokenizer.vocab_size == load(source)[1].vocab_size  # the source's tokenizer
    old, new = _base_weights(before), _base_weights(after)
    assert old.keys() <= new.keys()
    for name in old:  # the base is frozen, the routers' balancing bias included
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    adapters = lora_variables(after)
    names = {v.path.rsplit("/", 1)[-1] for v in adapters}
    assert {"lora_kernel_a", "lora_kernel_b", "experts_up_lora_a", "experts_up_lora_b"} <= names
    assert any(np.abs(v.numpy()).max() > 0 for v in adapters if v.path.endswith("_b"))
    ids = np.arange(16, dtype=np.int32)[None] % after.vocab_size
    assert np.abs(np.asarray(after(ids)) - np.asarray(before(ids))).max() > 0


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_full_fine_tuning_moves_the_base_from_the_source(source, tmp_path):
    out = tmp_path / "full"
    assert main(["train", "--init-from", str(source), "--out", str(out), *STEPS]) == 0
    before, _ = load(source)
    after, _ = load(out)
    old, new = _base_weights(before), _base_weights(after)
    moved = [n for n in old if not np.array_equal(old[n], new[n])]
    assert len(moved) > len(old) // 2
    # started from the source, not from scratch: still close to it after 4 steps
    name = next(n for n in old if n.endswith("q_a_proj/kernel"))
    assert np.abs(new[name] - old[name]).max() < 0.1 * np.abs(old[name]).max()


def test_merging_adapters_keeps_the_function(source, tmp_path):
    from deepseek_tf.models.lora import merge_lora

    config = apply_overrides(
        load_config("tiny-moe"),
        ["train.steps=3", "train.eval_every=0", "train.lora_rank=2",
         "train.lora_targets=[q_b_proj,shared_experts,experts]", "train.learning_rate=0.05"],
    )  # fmt: skip
    train(config, out=tmp_path / "run", verbose=0, init_from=source, sample_tokens=0)
    model, _ = load(tmp_path / "run")
    ids = np.arange(24, dtype=np.int32)[None] % model.vocab_size
    want = np.asarray(model(ids))
    merge_lora(model)
    assert all(not np.any(v.numpy()) for v in lora_variables(model) if v.path.endswith("_b"))
    np.testing.assert_allclose(np.asarray(model(ids)), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lora_rank=4", "--set", "train.lora_targets=[wq]"],
         "train.lora_targets: 'wq' selects nothing in this model"),
        (["--preset", "shakespeare-char"], "model.attention is 'mla' there but 'mha' in --config"),
        (["--resume"], "--init-from starts a new run; --resume continues one"),
    ],
)  # fmt: skip
def test_bad_fine_tuning_requests_are_one_line_errors(source, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["train", "--init-from", str(source), "--out", str(out), *STEPS, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_init_from_a_directory_that_is_neither(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["train", "--init-from", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "neither a run (config.yaml) nor a Hugging Face" in capsys.readouterr().err
