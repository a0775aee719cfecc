"""TopKRouter against Hugging Face's DeepSeek-V3 / V2 routers (torch, float32, eval)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers.router import TopKRouter

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DeepseekV2Config, DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (  # noqa: E402
    DeepseekV2TopkRouter,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3TopkRouter,
)

pytestmark = pytest.mark.hf

D_MODEL = 16
N_TOKENS = 64


def _inputs(seed):
    rng = np.random.RandomState(seed)
    return rng, rng.randn(N_TOKENS, D_MODEL).astype("float32")


def _ours(hf_router, n_experts, top_k, **kwargs):
    router = TopKRouter(D_MODEL, n_experts, top_k, **kwargs)
    router.build((None, D_MODEL))
    router.kernel.assign(hf_router.weight.detach().numpy().T)  # HF (E, d) -> (d, E)
    if hasattr(hf_router, "e_score_correction_bias"):
        router.e_score_correction_bias.assign(hf_router.e_score_correction_bias.numpy())
    return router


def _randomise(hf_router, rng, bias_std=0.0):
    with torch.no_grad():
        hf_router.weight.copy_(torch.from_numpy(0.4 * rng.randn(*hf_router.weight.shape)))
        if bias_std:
            bias = bias_std * rng.randn(*hf_router.e_score_correction_bias.shape)
            hf_router.e_score_correction_bias.copy_(torch.from_numpy(bias))


def _by_expert(idx, weight):
    """Rows of (expert ids, weights) sorted by expert id: order does not matter."""
    idx, weight = np.asarray(idx), np.asarray(weight)
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(weight, order, 1)


def _assert_same_routing(ours, hf_idx, hf_weight):
    idx, weight, scores = ours
    assert idx.dtype == tf.int32 and weight.dtype == tf.float32 and scores.dtype == tf.float32
    ours_idx, ours_w = _by_expert(idx, weight)
    ref_idx, ref_w = _by_expert(hf_idx.numpy(), hf_weight.detach().numpy())
    np.testing.assert_array_equal(ours_idx, ref_idx)
    np.testing.assert_allclose(ours_w, ref_w, rtol=1e-5, atol=1e-6)


# (n_experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
V3_CASES = [
    (8, 2, 1, 1, True, 1.0),
    (16, 4, 4, 2, True, 2.5),
    (16, 3, 4, 1, False, 1.0),
    (16, 6, 8, 3, True, 1.5),
    (12, 1, 3, 2, True, 2.0),
]


@pytest.mark.parametrize("case", V3_CASES, ids=str)
def test_noaux_tc_sigmoid_routing_matches_hf_v3(case):
    n_experts, top_k, n_group, topk_group, norm, scale = case
    config = DeepseekV3Config(
        hidden_size=D_MODEL,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    hf = DeepseekV3TopkRouter(config).eval()
    rng, x = _inputs(sum(case[:4]))
    _randomise(hf, rng, bias_std=0.3)
    ours = _ours(
        hf,
        n_experts,
        top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    with torch.no_grad():
        _, hf_weight, hf_idx = hf(torch.from_numpy(x))
    result = ours(x)
    _assert_same_routing(result, hf_idx, hf_weight)

    # The (random, non-zero) bias really changed the choice of some tokens.
    ours.e_score_correction_bias.assign(np.zeros(n_experts, "float32"))
    unbiased_idx, _ = _by_expert(ours(x)[0], ours(x)[1])
    assert (unbiased_idx != _by_expert(result[0], result[1])[0]).any()


# (topk_method, n_experts, top_k, n_group, topk_group, routed_scaling_factor)
V2_CASES = [
    ("greedy", 16, 4, 1, 1, 1.0),
    ("greedy", 8, 1, 1, 1, 2.0),
    ("group_limited_greedy", 16, 3, 4, 2, 1.0),
    ("group_limited_greedy", 16, 4, 8, 3, 16.0),
]


@pytest.mark.parametrize("case", V2_CASES, ids=str)
def test_softmax_routing_matches_hf_v2(case):
    method, n_experts, top_k, n_group, topk_group, scale = case
    config = DeepseekV2Config(
        hidden_size=D_MODEL,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
    )
    hf = DeepseekV2TopkRouter(config).eval()
    rng, x = _inputs(n_experts + top_k + n_group)
    _randomise(hf, rng)
    ours = _ours(
        hf,
        n_experts,
        top_k,
        scoring_func="softmax",
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=False,  # HF's V2 router never renormalises
        routed_scaling_factor=scale,
    )
    with torch.no_grad():
        _, hf_weight, hf_idx = hf(torch.from_numpy(x))
    _assert_same_routing(ours(x), hf_idx, hf_weight)


def test_group_limited_routing_stays_in_the_chosen_groups():
    router = TopKRouter(D_MODEL, 16, 4, n_group=4, topk_group=2, init_std=0.5)
    idx = np.asarray(router(np.random.RandomState(0).randn(N_TOKENS, D_MODEL))[0])
    groups_used = [len(set(row // 4)) for row in idx]
    assert max(groups_used) <= 2 and min(groups_used) >= 1


def test_weights_come_from_unbiased_scores_and_gradients_reach_the_kernel():
    router = TopKRouter(D_MODEL, 8, 2, norm_topk_prob=False, init_std=0.3)
    x = np.random.RandomState(1).randn(N_TOKENS, D_MODEL).astype("float32")
    router.build((None, D_MODEL))
    bias = np.zeros(8, "float32")
    bias[5] = 10.0  # expert 5 always chosen ...
    router.e_score_correction_bias.assign(bias)
    with tf.GradientTape() as tape:
        idx, weight, scores = router(x)
        loss = tf.reduce_sum(weight)
    assert (np.asarray(idx) == 5).any(axis=1).all()
    # ... with its plain sigmoid score as weight
    expected = np.take_along_axis(np.asarray(scores), np.asarray(idx), 1)
    np.testing.assert_allclose(np.asarray(weight), expected, rtol=1e-6)
    (grad,) = tape.gradient(loss, [router.kernel])
    assert np.abs(np.asarray(grad)).sum() > 0


def test_router_config_round_trip_variables_and_xla():
    router = TopKRouter(
        D_MODEL,
        12,
        3,
        scoring_func="softmax",
        topk_method="group_limited_greedy",
        n_group=3,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=2.0,
        init_std=0.1,
    )
    x = np.random.RandomState(2).randn(N_TOKENS, D_MODEL).astype("float32")
    idx, weight, _ = router(x)
    config = router.get_config()
    clone = TopKRouter.from_config(config)
    assert clone.get_config() == config
    clone.build((None, D_MODEL))
    clone.set_weights(router.get_weights())
    np.testing.assert_array_equal(np.asarray(clone(x)[0]), np.asarray(idx))

    assert tuple(router.kernel.shape) == (D_MODEL, 12)
    assert [v.name for v in router.non_trainable_weights] == ["e_score_correction_bias"]
    assert [v.name for v in router.trainable_weights] == ["kernel"]

    jit_idx, jit_weight, _ = tf.function(router, jit_compile=True)(x)
    np.testing.assert_array_equal(np.asarray(jit_idx), np.asarray(idx))
    np.testing.assert_allclose(np.asarray(jit_weight), np.asarray(weight), rtol=1e-6)


def test_router_is_float32_under_mixed_precision():
    router = TopKRouter(D_MODEL, 8, 2, dtype=keras.DTypePolicy("mixed_bfloat16"))
    x = np.random.RandomState(3).randn(N_TOKENS, D_MODEL).astype("float32")
    idx, weight, scores = router(tf.cast(x, "bfloat16"))
    assert router.kernel.dtype == "float32"
    assert weight.dtype == tf.float32 and scores.dtype == tf.float32 and idx.dtype == tf.int32
    # same as a float32 router on the bfloat16-rounded input
    ref = TopKRouter(D_MODEL, 8, 2)
    ref.build((None, D_MODEL))
    ref.set_weights(router.get_weights())
    x_bf16 = np.asarray(tf.cast(tf.cast(x, "bfloat16"), "float32"))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref(x_bf16)[2]), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scoring_func": "relu"},
        {"topk_method": "random"},
        {"n_group": 3},
        {"n_group": 4, "topk_group": 5},
        {"n_group": 4, "topk_group": 1, "top_k": 3},
    ],
    ids=str,
)
def test_invalid_arguments_raise(kwargs):
    args = {"d_model": 4, "n_experts": 8, "top_k": 2, **kwargs}
    with pytest.raises(ValueError):
        TopKRouter(**args)
