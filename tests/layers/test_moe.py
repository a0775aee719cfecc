"""DeepSeekMoE: sparse == dense dispatch, XLA, Hugging Face parity, load balancing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers.moe import DeepSeekMoE
from deepseek_tf.layers.moe_tiles import auto_tile_size, dispatch_plan

D = 16
H = 8


def _moe(**kwargs):
    args = {
        "d_model": D,
        "moe_hidden_dim": H,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "init_std": 0.3,
        "output_init_std": 0.3,
        **kwargs,
    }
    return DeepSeekMoE(**args)


def _pair(x, **kwargs):
    """A sparse and a dense layer with the same (random, bias included) weights."""
    sparse, dense = _moe(dispatch="sparse", **kwargs), _moe(dispatch="dense", **kwargs)
    sparse(x)
    dense(x)
    n = sparse.n_routed_experts
    sparse.gate.e_score_correction_bias.assign(np.random.RandomState(7).randn(n) * 0.2)
    dense.set_weights(sparse.get_weights())
    return sparse, dense


def _out_and_grads(layer, x, projection, fn=None):
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
            loss = tf.reduce_sum(out["x"] * projection) + 3.0 * out["aux_loss"]
        grads = tape.gradient(loss, [x, *layer.trainable_weights])
        return out["x"], [tf.convert_to_tensor(g) for g in grads]

    return (fn or (lambda f: f))(run)(tf.constant(x))


# (kwargs, input shape): token counts not divisible by the tile, k = 1, groups, softmax
EQUIVALENCE_CASES = [
    ({"tile_size": 4}, (2, 7)),
    ({"num_experts_per_tok": 1, "n_shared_experts": 0, "tile_size": 8}, (3, 5)),
    (
        {
            "n_routed_experts": 16,
            "num_experts_per_tok": 4,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "seq_aux_loss_alpha": 0.1,
        },
        (2, 9),
    ),
    (
        {
            "scoring_func": "softmax",
            "topk_method": "group_limited_greedy",
            "n_group": 2,
            "norm_topk_prob": False,
            "num_experts_per_tok": 3,
            "n_shared_experts": 2,
            "tile_size": 3,
        },
        (1, 11),
    ),
    ({"scoring_func": "softmax", "topk_method": "greedy", "tile_size": 1}, (2, 3)),
]


@pytest.mark.parametrize("kwargs,shape", EQUIVALENCE_CASES, ids=str)
def test_sparse_equals_dense_forward_and_gradients(kwargs, shape):
    rng = np.random.RandomState(sum(shape))
    x = rng.randn(*shape, D).astype("float32")
    projection = rng.randn(*shape, D).astype("float32")
    sparse, dense = _pair(x, **kwargs)
    out_s, grads_s = _out_and_grads(sparse, x, projection)
    out_d, grads_d = _out_and_grads(dense, x, projection)
    np.testing.assert_allclose(out_s, out_d, rtol=1e-5, atol=1e-5)
    names = ["x"] + [w.path for w in sparse.trainable_weights]
    assert {"experts_gate", "experts_up", "experts_down", "kernel"} <= {
        n.split("/")[-1] for n in names
    }
    for name, g_s, g_d in zip(names, grads_s, grads_d):
        assert np.abs(np.asarray(g_d)).max() > 0, name
        np.testing.assert_allclose(g_s, g_d, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("jit", [False, True])
def test_capacity_overflow_rounds_are_exact(jit):
    # Every token routed to experts 0 and 1: 64 assignments each against a capacity of 24
    # rows, so the capacity dispatch adds one whole overflow round of 24 rows and two of 8
    # (both overflow loops run). Nothing is dropped.
    from deepseek_tf.layers.moe_capacity import capacity_rows

    rng = np.random.RandomState(3)
    x = rng.randn(4, 16, D).astype("float32")
    projection = rng.randn(4, 16, D).astype("float32")
    sparse, dense = _pair(x)
    skew = np.zeros(8, "float32")
    skew[:2] = 100.0
    for layer in (sparse, dense):
        layer.gate.e_score_correction_bias.assign(skew)
    assert capacity_rows(64 * 2, 8, 1.25) == 24
    wrap = (lambda f: tf.function(f, jit_compile=True)) if jit else None
    out_s, grads_s = _out_and_grads(sparse, x, projection, fn=wrap)
    out_d, grads_d = _out_and_grads(dense, x, projection)
    np.testing.assert_allclose(out_s, out_d, rtol=1e-5, atol=1e-5)
    for g_s, g_d in zip(grads_s, grads_d):
        np.testing.assert_allclose(g_s, g_d, rtol=1e-5, atol=1e-5)


def test_sparse_under_xla_equals_eager():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 13, D).astype("float32")
    projection = rng.randn(3, 13, D).astype("float32")
    layer, _ = _pair(x, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2)
    out, grads = _out_and_grads(layer, x, projection)
    jit_out, jit_grads = _out_and_grads(
        layer, x, projection, fn=lambda f: tf.function(f, jit_compile=True)
    )
    np.testing.assert_allclose(jit_out, out, rtol=1e-5, atol=1e-5)
    for g, jit_g in zip(grads, jit_grads):
        np.testing.assert_allclose(jit_g, g, rtol=1e-5, atol=1e-5)


def test_dispatch_plan_rows_are_exact_and_bounded():
    rng = np.random.RandomState(1)
    n, k, n_experts, tile = 37, 3, 8, 4
    others = [0, 1, 2, 3, 4, 6, 7]
    idx = np.stack(
        [rng.choice(n_experts, k, replace=False) for _ in range(n - 20)]
        + [[5, *rng.choice(others, k - 1, replace=False)] for _ in range(20)]  # a hot expert
    ).astype("int32")
    plan = dispatch_plan(tf.constant(idx), n_experts, tile)
    dest, row_token = np.asarray(plan["dest"]), np.asarray(plan["row_token"])
    tile_expert = np.asarray(plan["tile_expert"])
    # static bound: N k assignments plus at most E (tile - 1) padding rows
    assert plan["n_tiles"] * tile <= n * k + n_experts * (tile - 1)
    assert len(set(dest.ravel())) == n * k  # every assignment has its own row
    np.testing.assert_array_equal(row_token[dest], np.repeat(np.arange(n), k).reshape(n, k))
    np.testing.assert_array_equal(tile_expert[dest // tile], idx)  # ... in its expert's tile
    assert (row_token[np.setdiff1d(np.arange(len(row_token)), dest)] == n).all()  # padding
    # outside XLA: only the tiles in use, the same rows
    used = dispatch_plan(tf.constant(idx), n_experts, tile, used_only=True)
    counts = np.bincount(idx.ravel(), minlength=n_experts)
    n_used = int(used["n_tiles"])
    assert n_used == (-(-counts // tile)).sum() <= plan["n_tiles"]
    np.testing.assert_array_equal(np.asarray(used["dest"]), dest)
    np.testing.assert_array_equal(np.asarray(used["row_token"]), row_token[: n_used * tile])
    np.testing.assert_array_equal(np.asarray(used["tile_expert"]), tile_expert[:n_used])
    assert auto_tile_size(6, 64) == 1  # decoding: no padding rows
    assert auto_tile_size(2048 * 6, 64) == 64


@pytest.mark.parametrize("jit", [False, True])
def test_inactive_rows_are_not_routed(jit):
    """A decoding server's idle slots (`active` False): the active rows' output is the
    unmasked layer's, the idle rows' routed part is zero, and outside XLA the dispatch
    lays out only the active rows' tiles (no weights gathered for the idle)."""
    x = np.random.RandomState(3).randn(6, 1, D).astype("float32")  # (B, T=1, d): decoding
    layer = _moe(dispatch="sparse", tile_size=1, n_shared_experts=0)
    active = np.array([True, False, True, False, False, True])
    call = tf.function(lambda x, a: layer(x, active=a)["x"], jit_compile=jit)
    full = np.asarray(layer(tf.constant(x))["x"])
    masked = np.asarray(call(tf.constant(x), tf.constant(active)))
    np.testing.assert_allclose(masked[active], full[active], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(masked[~active], 0.0)
    idx = np.asarray(layer.gate(tf.constant(x[:, 0]))[0])  # (B, k)
    plan = dispatch_plan(tf.constant(idx), layer.n_routed_experts, 1, used_only=True,
                         valid=tf.constant(active))  # fmt: skip
    assert int(plan["n_tiles"]) == idx[active].size  # tiles of 1 row: the active assignments
    assert (np.asarray(plan["dest"])[~active] == int(plan["n_tiles"])).all()


def _hf_moe(config_kwargs, rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf = DeepseekV3MoE(DeepseekV3Config(hidden_size=D, moe_intermediate_size=H, **config_kwargs))
    with torch.no_grad():
        for p in [*hf.parameters(), *hf.buffers()]:
            p.copy_(torch.from_numpy(0.3 * rng.randn(*p.shape)))
    return torch, hf.eval()


def _copy_hf_weights(hf, layer):
    gate_up = hf.experts.gate_up_proj.detach().numpy()  # (E, 2h, d)
    layer.experts_gate.assign(gate_up[:, :H].transpose(0, 2, 1))  # (E, d, h)
    layer.experts_up.assign(gate_up[:, H:].transpose(0, 2, 1))
    layer.experts_down.assign(hf.experts.down_proj.detach().numpy().transpose(0, 2, 1))
    layer.gate.kernel.assign(hf.gate.weight.detach().numpy().T)
    layer.gate.e_score_correction_bias.assign(hf.gate.e_score_correction_bias.numpy())
    for name in ("gate_proj", "up_proj", "down_proj"):
        weight = getattr(hf.shared_experts, name).weight.detach().numpy()
        getattr(layer.shared_experts, name).kernel.assign(weight.T)


@pytest.mark.hf
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_matches_hf_deepseek_v3_moe(dispatch):
    rng = np.random.RandomState(3)
    hf_kwargs = {
        "n_routed_experts": 16,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    }
    torch, hf = _hf_moe(hf_kwargs, rng)
    x = rng.randn(2, 9, D).astype("float32")
    layer = _moe(
        n_routed_experts=16,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        dispatch=dispatch,
    )
    layer(x)
    _copy_hf_weights(hf, layer)
    with torch.no_grad():
        expected = hf(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(layer(x)["x"]), expected, rtol=1e-5, atol=1e-5)


def _silu(a):
    return a / (1.0 + np.exp(-a))


def test_bias_only_selects_and_gate_weights_use_unbiased_scores():
    rng = np.random.RandomState(4)
    x = rng.randn(2, 6, D).astype("float32")
    layer = _moe(n_shared_experts=0, num_experts_per_tok=3, routed_scaling_factor=1.5)
    layer(x)
    bias = np.zeros(8, "float32")
    bias[6] = 5.0  # far above any sigmoid score gap
    layer.gate.e_score_correction_bias.assign(bias)
    out = layer(x)
    assert float(out["expert_load"][6]) == pytest.approx(1 / 3)  # chosen by every token

    tokens = x.reshape(-1, D)
    scores = 1.0 / (1.0 + np.exp(-(tokens @ layer.gate.kernel.numpy())))  # (N, E)
    chosen = np.argsort(-(scores + bias), axis=1)[:, :3]  # (N, 3)
    weights = np.take_along_axis(scores, chosen, 1)
    weights = 1.5 * weights / weights.sum(1, keepdims=True)  # unbiased normalisation
    wg, wu, wd = (w.numpy() for w in (layer.experts_gate, layer.experts_up, layer.experts_down))
    expected = np.zeros_like(tokens)
    for n in range(len(tokens)):
        for e, w in zip(chosen[n], weights[n]):
            hidden = _silu(tokens[n] @ wg[e]) * (tokens[n] @ wu[e])
            expected[n] += w * (hidden @ wd[e])
    np.testing.assert_allclose(np.asarray(out["x"]).reshape(-1, D), expected, rtol=1e-5, atol=1e-5)


def test_update_bias_moves_overloaded_down_and_underloaded_up():
    layer = _moe(n_routed_experts=4, bias_update_speed=0.01)
    layer(np.zeros((1, 2, D), "float32"))
    load = tf.constant([0.5, 0.25, 0.05, 0.2])  # mean 0.25
    tf.function(layer.update_bias)(load)
    np.testing.assert_allclose(
        layer.gate.e_score_correction_bias.numpy(), [-0.01, 0.0, 0.01, 0.01], atol=1e-7
    )
    layer.update_bias(load)
    np.testing.assert_allclose(
        layer.gate.e_score_correction_bias.numpy(), [-0.02, 0.0, 0.02, 0.02], atol=1e-7
    )
    for kwargs in ({"bias_update_speed": 0.0}, {"topk_method": "greedy", "bias_update_speed": 0.1}):
        still = _moe(n_routed_experts=4, **kwargs)
        still(np.zeros((1, 2, D), "float32"))
        still.update_bias(load)
        assert not still.gate.e_score_correction_bias.numpy().any()


def _train_balance(bias_update_speed, steps):
    """Max/mean loads of a jit-compiled training loop on inputs skewed to experts 0 and 1."""
    keras.utils.set_random_seed(0)
    rng = np.random.RandomState(0)
    shape = (8, 64, D)
    layer = _moe(n_shared_experts=0, bias_update_speed=bias_update_speed, init_std=0.1)
    layer(np.zeros(shape, "float32"))
    kernel = layer.gate.kernel.numpy()
    kernel[:, :2] += 0.15  # experts 0 and 1 follow the inputs' common mean direction
    layer.gate.kernel.assign(kernel)
    optimizer = keras.optimizers.SGD(0.05)
    target = tf.constant(rng.randn(*shape).astype("float32"))

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            out = layer(x, training=True)
            loss = tf.reduce_mean(tf.square(out["x"] - target))
        optimizer.apply(tape.gradient(loss, layer.trainable_weights), layer.trainable_weights)
        layer.update_bias(out["expert_load"])
        return out["expert_load"]

    loads = np.stack([step(rng.randn(*shape).astype("float32") + 1.0) for _ in range(steps)])
    return loads.max(1) / loads.mean(1), loads


def test_bias_update_balances_a_skewed_training_run():
    ratios, loads = _train_balance(0.01, 170)
    assert ratios[0] > 1.5
    assert ratios[-20:].mean() < 1.35  # per-step loads oscillate around balance ...
    recent = loads[-20:].mean(0)
    assert recent.max() / recent.mean() < 1.15  # ... and average out to it
    ratios_off, _ = _train_balance(0.0, 30)  # no update: stays skewed
    assert ratios_off[-10:].min() > 1.5


def test_aux_loss_zero_without_alpha_and_hand_computed_with_it():
    rng = np.random.RandomState(5)
    b, t, e, k, alpha = 2, 3, 4, 2, 0.3
    x = rng.randn(b, t, D).astype("float32")
    off = _moe(n_routed_experts=e, num_experts_per_tok=k)
    aux = off(x)["aux_loss"]
    assert aux.dtype == tf.float32 and aux.shape == () and float(aux) == 0.0

    layer = _moe(n_routed_experts=e, num_experts_per_tok=k, seq_aux_loss_alpha=alpha)
    layer(x)
    bias = np.array([0.3, -0.2, 0.0, 0.1], "float32")
    layer.gate.e_score_correction_bias.assign(bias)
    out = layer(x)
    kernel = layer.gate.kernel.numpy()
    expected = 0.0
    for seq in range(b):
        s = 1.0 / (1.0 + np.exp(-(x[seq] @ kernel)))  # (T, E)
        s_norm = s / s.sum(1, keepdims=True)
        chosen = np.argsort(-(s + bias), axis=1)[:, :k]  # selection uses the bias
        total = 0.0
        for i in range(e):
            f_i = e / (k * t) * sum(int(i in chosen[tok]) for tok in range(t))
            p_i = s_norm[:, i].mean()
            total += f_i * p_i
        expected += alpha * total / b
    assert float(out["aux_loss"]) == pytest.approx(expected, rel=1e-5)


def test_expert_load_counts_assignments_and_sums_to_one():
    rng = np.random.RandomState(6)
    x = rng.randn(3, 10, D).astype("float32")
    layer = _moe(num_experts_per_tok=3)
    out = layer(x)
    idx = np.asarray(layer.gate(x.reshape(-1, D))[0])
    load = np.asarray(out["expert_load"])
    assert load.dtype == np.float32 and load.shape == (8,)
    np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(load, np.bincount(idx.ravel(), minlength=8) / idx.size, rtol=1e-6)


@pytest.mark.parametrize("shared", [0, 2])
def test_hidden_and_mixed_precision(shared):
    rng = np.random.RandomState(8)
    x = rng.randn(2, 5, D).astype("float32")
    policy = keras.DTypePolicy("mixed_bfloat16")
    mixed = _moe(n_shared_experts=shared, num_experts_per_tok=3, dtype=policy)
    out = mixed(x, return_hidden=True)
    assert out["x"].dtype == tf.bfloat16 and out["x"].shape == (2, 5, D)
    assert out["expert_load"].dtype == tf.float32 and out["aux_loss"].dtype == tf.float32
    assert out["hidden"].shape == (2, 5, H * (shared or 3))
    assert mixed.gate.kernel.dtype == "float32"
    # float32 twin on the same bfloat16-rounded input: same routing, bf16-level error
    full = _moe(n_shared_experts=shared, num_experts_per_tok=3)
    full(x)
    full.set_weights(mixed.get_weights())
    x_bf16 = np.asarray(tf.cast(tf.cast(x, "bfloat16"), "float32"))
    tokens = x.reshape(-1, D)
    np.testing.assert_array_equal(mixed.gate(tokens)[0], full.gate(x_bf16.reshape(-1, D))[0])
    ref = np.asarray(full(x_bf16)["x"])
    got = np.asarray(tf.cast(out["x"], "float32"))
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    jit = tf.function(lambda x: mixed(x)["x"], jit_compile=True)(x)
    # XLA fuses in another order: bf16-level differences (CPU-dependent), as above
    assert np.abs(np.asarray(tf.cast(jit, "float32")) - got).max() < 0.03 * np.abs(got).max()


def test_invalid_dispatch_raises():
    with pytest.raises(ValueError):
        _moe(dispatch="capacity")


def test_sparse_with_unknown_batch_and_length():
    x = np.random.RandomState(9).randn(2, 7, D).astype("float32")
    layer = _moe(n_shared_experts=0, seq_aux_loss_alpha=0.1)
    expected = layer(x, return_hidden=True)
    spec = tf.TensorSpec((None, None, D), "float32")
    got = tf.function(lambda x: layer(x, return_hidden=True), input_signature=[spec])(x)
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(value), atol=1e-6, err_msg=key)


def test_capacity_dispatch_skips_assignments_marked_elsewhere():
    """Ids below 0 (expert parallelism: another shard's experts) are neither computed nor
    given a gradient; the others are exactly what a dispatch of them alone gives."""
    from deepseek_tf.layers.moe_capacity import capacity_dispatch

    rng = np.random.RandomState(5)
    tokens = tf.constant(rng.randn(32, D).astype("float32"))
    w = [tf.constant(rng.randn(*s).astype("float32")) for s in ((4, D, 6), (4, D, 6), (4, 6, D))]
    idx = rng.randint(0, 8, size=(32, 2)).astype("int32")
    idx[:, 1] = (idx[:, 0] + 1 + rng.randint(0, 7, size=32)) % 8  # distinct per token
    local = np.where(idx < 4, idx, -1)  # experts 4..7 live elsewhere
    with tf.GradientTape() as tape:
        tape.watch([tokens, *w])
        out, _ = capacity_dispatch(tokens, tf.constant(local), *w)  # (32, 2, D)
        loss = tf.reduce_sum(out * out)
    grads = tape.gradient(loss, [tokens, *w])
    np.testing.assert_array_equal(out.numpy()[local < 0], 0.0)
    for n in range(32):  # each kept assignment: its expert's SwiGLU on its token
        for slot in range(2):
            e = local[n, slot]
            if e < 0:
                continue
            x = tokens[n : n + 1]
            want = (tf.nn.silu(x @ w[0][e]) * (x @ w[1][e])) @ w[2][e]
            np.testing.assert_allclose(out[n, slot : slot + 1], want, rtol=1e-5, atol=1e-5)
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    only_remote = np.all(local < 0, axis=1)  # tokens with no local expert get no gradient
    np.testing.assert_array_equal(grads[0].numpy()[only_remote], 0.0)
