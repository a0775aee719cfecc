"""Structured pruning: physically smaller models, exact shrinking, importance, CLI, errors."""

import json

import numpy as np
import pytest
from compress_helpers import train_run

from deepseek_tf.cli.main import main
from deepseek_tf.compress.finetune import validation_loss
from deepseek_tf.compress.pruning import plan, prune_model, removal_count
from deepseek_tf.compress.run_io import load_source
from deepseek_tf.config.loader import load_config, update_config
from deepseek_tf.data.pipeline import make_eval_dataset
from deepseek_tf.errors import CompressionError
from deepseek_tf.rundir import RunDir


def _batch(config, tokenizer):
    """`(8, T)` validation token ids."""
    return next(iter(make_eval_dataset(config.data, tokenizer, 8)))[0]


def _prune(run_dir, **kwargs):
    source = load_source(run_dir)
    config, model, tokenizer = source.config, source.model, source.tokenizer
    new_config, new_model, info = prune_model(model, config, tokenizer, log=None, **kwargs)
    return config, model, tokenizer, new_config, new_model, info


def test_schedule_is_polynomial_and_reaches_the_final_count():
    counts = [removal_count(s, 20, 3.0, 10) for s in range(31)]
    assert counts[0] == 0 and counts[20] == counts[30] == 10
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    assert counts[5] > 5  # cubic: most units go early, while the model can still adapt


def test_heads_and_ffn_are_physically_removed_and_match_the_masked_model(trained_run):
    config, masked, tokenizer, new_config, new_model, info = _prune(
        trained_run, sparsity=0.5, targets=("heads", "ffn"), importance="gradient", steps=3
    )
    c = new_config.compression
    assert c.layer_n_heads == (2, 2) and c.layer_ffn_dims == (32, 32)
    assert info["removed"]["heads"] == [2, 2] and info["removed"]["ffn"] == [32, 32]
    assert len(info["losses"]) == 3 and info["events"]
    for block in new_model.blocks:
        attn = block.attention
        assert (attn.n_heads, attn.n_kv_heads) == (2, 1)
        assert tuple(attn.q_proj.kernel.shape) == (32, 16)
        assert tuple(attn.relative_bias.table.shape) == (8, 2)
        assert tuple(block.ffn.down_proj.kernel.shape) == (32, 32)
    assert new_model.count_params() < 0.7 * masked.count_params()
    ids = _batch(config, tokenizer)
    np.testing.assert_allclose(new_model(ids).numpy(), masked(ids).numpy(), atol=1e-5)


def test_importance_pruning_beats_random_pruning(trained_run):
    source = load_source(trained_run)
    config, model, tokenizer = source.config, source.model, source.tokenizer
    ids = _batch(config, tokenizer)
    reference = model(ids).numpy()

    def pruned(importance, seed=0):
        *_, new_config, new_model, _ = _prune(
            trained_run, sparsity=0.5, targets=("ffn",), importance=importance, seed=seed
        )
        drift = float(np.abs(new_model(ids).numpy() - reference).mean())
        return drift, validation_loss(new_model, new_config, tokenizer, 4)

    randoms = [pruned("random", seed) for seed in (0, 1)]
    for importance in ("magnitude", "gradient"):
        drift, loss = pruned(importance)
        assert drift < 0.7 * min(d for d, _ in randoms), importance
        assert loss < min(v for _, v in randoms), importance


def test_cli_prune_writes_a_loadable_smaller_run(trained_run, tmp_path, capsys):
    from deepseek_tf.rundir import load_run

    out = tmp_path / "pruned"
    args = ["compress", "prune", str(trained_run), "--out", str(out), "--steps", "4"]
    args += ["--sparsity", "0.5", "--importance", "magnitude", "--unstructured", "--quiet"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["method"] == "prune" and record["options"]["steps"] == 4
    assert record["parameters_after"] < record["parameters_before"]
    assert record["removed"]["ffn"] == [32, 32] and record["unstructured_zeroed"] > 0
    assert np.isfinite(record["val_loss_after"])
    history = json.loads((out / "compression.json").read_text())
    assert history[-1]["method"] == "prune"
    assert RunDir(out).read_config().compression.layer_n_heads == (2, 2)
    model, _ = load_run(out)
    assert model.count_params() == record["parameters_after"]
    down = model.blocks[0].ffn.down_proj.kernel.numpy()
    assert down.shape == (32, 32) and np.mean(down == 0) >= 0.5


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
@pytest.mark.parametrize("groups", [1, 2], ids=["flat", "group-limited"])
def test_moe_experts_and_mla_heads_are_pruned(tmp_path, groups):
    overrides = [f"model.n_group={groups}", "model.topk_group=1", "train.steps=2"]
    overrides += ["train.eval_every=2", "train.checkpoint_every=2"]
    run_dir = tmp_path / "moe"
    train_run(run_dir, "tiny-moe", overrides)
    config, masked, tokenizer, new_config, new_model, info = _prune(
        run_dir, sparsity=0.5, targets=("heads", "experts"), importance="magnitude", steps=2
    )
    c = new_config.compression
    assert c.layer_n_experts == (0, 4, 4) and c.layer_n_heads == (2, 2, 2)
    assert info["removed"]["experts"] == [0, 4, 4]
    moe = new_model.blocks[1].ffn
    assert tuple(moe.experts_gate.shape) == (4, 32, 16)
    assert tuple(moe.gate.kernel.shape) == (32, 4)
    assert tuple(new_model.blocks[0].attention.kv_b_proj.kernel.shape) == (16, 32)
    assert new_model.mtp_modules[0].block.ffn.n_routed_experts == 8  # MTP left alone
    assert new_model.count_params() < masked.count_params()
    assert moe.gate.n_group == groups
    dead = masked.blocks[1].ffn.gate.e_score_correction_bias.numpy() < -1e8  # (8,)
    assert [int(d.sum()) for d in np.split(dead, groups)] == [4 // groups] * groups
    ids = _batch(config, tokenizer)
    np.testing.assert_allclose(new_model(ids).numpy(), masked(ids).numpy(), atol=1e-5)


def _one_line_error(capsys, args, match):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err, err


def test_incompatible_requests_fail_before_any_work(trained_run, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["compress", "prune", str(trained_run), "--out", str(out), "--quiet"]
    _one_line_error(capsys, [*base, "--sparsity", "1.0"], "--sparsity")
    _one_line_error(
        capsys, [*base, "--sparsity", "0.9", "--targets", "heads"], "would keep 0 of 2 kv groups"
    )
    _one_line_error(capsys, [*base, "--targets", "experts"], "--targets experts")
    _one_line_error(capsys, [*base, "--targets", "neurons"], "--targets")
    assert not out.exists()


def test_plan_refuses_shared_layers_grouped_experts_and_too_few_experts():
    def with_model(config, **changes):
        return update_config(config, model=changes)

    moe = with_model(load_config("tiny-moe"), vocab_size=11)  # n_group=2, topk_group=1, k=2
    # groups keep equal numbers of experts, at least 2 each (their score sums the top 2)
    assert plan(moe, 0.5, ["experts"]) == {("experts", 1): 4, ("experts", 2): 4}
    assert plan(moe, 0.3, ["experts"]) == {("experts", 1): 6, ("experts", 2): 6}
    with pytest.raises(CompressionError, match="would keep 2 of 8 experts .needs at least 4"):
        plan(moe, 0.85, ["experts"])
    v2 = with_model(moe, scoring_func="softmax", topk_method="group_limited_greedy")
    with pytest.raises(CompressionError, match="noaux_tc"):
        plan(v2, 0.5, ["experts"])
    flat = with_model(moe, n_group=1, topk_group=1)
    assert plan(flat, 0.5, ["experts"]) == {("experts", 1): 4, ("experts", 2): 4}
    with pytest.raises(CompressionError, match="num_experts_per_tok|needs at least 2"):
        plan(flat, 0.85, ["experts"])
    shared = with_model(load_config("tiny"), share_adjacent="ffn", vocab_size=11)
    with pytest.raises(CompressionError, match="share_adjacent"):
        plan(shared, 0.3, ["ffn"])
