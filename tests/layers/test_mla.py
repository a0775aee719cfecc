"""MultiHeadLatentAttention: parity with Hugging Face DeepseekV3Attention, cached decoding on
both paths, cache sizes, XLA and mixed precision.

Only the parity tests need torch/transformers (test-only dependencies); they are marked
`hf` and skip where those are absent, so the rest of the module runs anywhere.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers.mla import MultiHeadLatentAttention, mla_cache_values_per_token
from deepseek_tf.layers.rotary import yarn_attention_factor

SMALL = {
    "d_model": 32,
    "n_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
}
# YaRN with a temperature (scale * mscale(factor, 0.8)**2) and cos/sin factor (0.9/0.8 ratio).
YARN = {
    "rope_scaling_factor": 4.0,
    "rope_original_max_len": 8,
    "yarn_beta_fast": 8.0,
    "yarn_beta_slow": 1.0,
    "yarn_mscale": 0.9,
    "yarn_mscale_all_dim": 0.8,
}


def _layer(q_lora_rank=12, absorb=True, yarn=False, dtype=None, seed=0):
    layer = MultiHeadLatentAttention(
        q_lora_rank=q_lora_rank,
        absorb=absorb,
        init_std=0.2,
        output_init_std=0.2,
        dtype=dtype,
        **SMALL,
        **(YARN if yarn else {}),
    )
    layer.build((None, None, SMALL["d_model"]))
    rng = np.random.RandomState(seed)
    for w in layer.weights:  # random, non-trivial norm scales too
        if w.path.endswith("scale"):
            w.assign(rng.uniform(0.5, 1.5, w.shape))
    return layer


def _relative_error(actual, expected):
    """max |actual - expected| / max |expected| (element-wise relative error is ill-posed
    near zero)."""
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# --------------------------------------------------------------------------- HF parity


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.masking_utils import create_causal_mask
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as modeling

    return torch, DeepseekV3Config, create_causal_mask, modeling


def _yarn(factor, original, beta_fast, beta_slow, mscale, mscale_all_dim, theta=10000.0):
    return {
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
        "rope_theta": theta,
    }


HF_CASES = {  # name: (q_lora_rank, YaRN rope parameters or None)
    "q_proj": (0, None),
    "q_lora": (12, None),
    "q_lora+yarn": (12, _yarn(4.0, 8, 8.0, 1.0, 0.9, 0.8)),
    # mscale without mscale_all_dim: HF multiplies cos/sin by mscale(factor, 1), not
    # mscale(factor, mscale), and leaves the softmax scale alone.
    "q_proj+yarn-mscale-only": (0, _yarn(8.0, 16, 32.0, 1.0, 2.0, 0.0, theta=500.0)),
    "q_lora+yarn-v3": (12, _yarn(40.0, 4, 32.0, 1.0, 1.0, 1.0)),  # DeepSeek-V3's mscales
}


@pytest.mark.hf
@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_hf_deepseek_v3_attention(hf, case):
    torch, DeepseekV3Config, create_causal_mask, modeling = hf
    q_lora_rank, yarn = HF_CASES[case]
    theta = (yarn or {}).get("rope_theta", 10000.0)
    rope = {"rope_type": "default", "rope_theta": theta}
    kwargs = {"rope_theta": theta}
    if yarn:
        rope = {"rope_type": "yarn", "type": "yarn", **yarn}
        kwargs.update(
            rope_scaling_factor=yarn["factor"],
            rope_original_max_len=yarn["original_max_position_embeddings"],
            yarn_beta_fast=yarn["beta_fast"],
            yarn_beta_slow=yarn["beta_slow"],
            yarn_mscale=yarn["mscale"],
            yarn_mscale_all_dim=yarn["mscale_all_dim"],
        )
    config = DeepseekV3Config(
        vocab_size=16,
        hidden_size=SMALL["d_model"],
        num_attention_heads=SMALL["n_heads"],
        num_key_value_heads=SMALL["n_heads"],
        q_lora_rank=q_lora_rank or None,
        kv_lora_rank=SMALL["kv_lora_rank"],
        qk_nope_head_dim=SMALL["qk_nope_head_dim"],
        qk_rope_head_dim=SMALL["qk_rope_head_dim"],
        v_head_dim=SMALL["v_head_dim"],
        max_position_embeddings=int(yarn["factor"] * yarn["original_max_position_embeddings"])
        if yarn
        else 64,
        rope_parameters=rope,
        rope_interleave=True,
        num_hidden_layers=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = modeling.DeepseekV3Attention(config, layer_idx=0).eval()
    rotary = modeling.DeepseekV3RotaryEmbedding(config)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)

    layer = MultiHeadLatentAttention(q_lora_rank=q_lora_rank, **SMALL, **kwargs)
    x = np.random.RandomState(1).randn(2, 24, SMALL["d_model"]).astype("float32")
    layer.build(x.shape)
    params = dict(ref.named_parameters())
    for w in layer.weights:
        sub, kind = w.path.split("/")[-2:]
        value = params[f"{sub}.weight"].detach().numpy()
        w.assign(value.T if kind == "kernel" else value)

    # as DeepseekV3Model.forward does it: position ids, shared cos/sin, causal mask
    with torch.no_grad():
        xt = torch.from_numpy(x)
        position_ids = torch.arange(x.shape[1])[None]
        mask = create_causal_mask(
            config=config,
            inputs_embeds=xt,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        expected = ref(xt, rotary(xt, position_ids), mask)[0].numpy()
    assert rotary.attention_scaling == pytest.approx(layer.rope.attention_factor)
    assert ref.scaling == pytest.approx(layer.scale)
    np.testing.assert_allclose(layer.rope.inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    for absorb in (True, False):  # the uncached forward is the same computation for both
        layer.absorb = absorb
        error = _relative_error(np.asarray(layer(x)), expected)
        print(f"{case} absorb={absorb}: max relative error {error:.2e}")
        assert error < 1e-4


# --------------------------------------------------------------------------- caching


def _decode(layer, x, prefill, max_len=16):
    cache = layer.init_cache(x.shape[0], max_len)
    out, cache = layer(x[:, :prefill], cache=cache, cache_index=0)
    steps = [np.asarray(out)]
    for i in range(prefill, x.shape[1]):
        out, cache = layer(x[:, i : i + 1], cache=cache, cache_index=i)
        steps.append(np.asarray(out))
    return np.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "naive"])
def test_cached_decoding_matches_uncached_forward(absorb, yarn):
    layer = _layer(q_lora_rank=12 if yarn else 0, absorb=absorb, yarn=yarn)
    x = np.random.RandomState(2).randn(2, 11, SMALL["d_model"]).astype("float32")
    full = np.asarray(layer(x))
    changed = x.copy()
    changed[:, 6:] += 1.0  # causal: a later token never changes an earlier output
    np.testing.assert_allclose(np.asarray(layer(changed))[:, :6], full[:, :6], atol=1e-5)
    assert not np.allclose(np.asarray(layer(changed))[:, 6:], full[:, 6:], atol=1e-3)

    decoded, cache = _decode(layer, x, prefill=4)
    np.testing.assert_allclose(decoded, full, atol=1e-5)
    assert set(cache) == ({"kv", "pe"} if absorb else {"k", "v"})
    per_token = sum(int(np.prod(v.shape[2:])) for v in cache.values())
    assert per_token == layer.cache_values_per_token()


def test_prepared_absorbed_kernels_decode_as_the_kernel_does_and_are_never_saved():
    """The decode loops' copies of `kv_b_proj` in the absorbed layout give the outputs of
    the kernel itself, follow a weight change at the next `prepare_decoding`, and are no
    weight of the layer (so no checkpoint holds them)."""
    layer = _layer(absorb=True, yarn=True)
    x = np.random.RandomState(2).randn(2, 7, SMALL["d_model"]).astype("float32")
    plain, _ = _decode(layer, x, prefill=3)  # kernels derived inside each call
    weights = len(layer.weights)
    layer.prepare_decoding()
    prepared, _ = _decode(layer, x, prefill=3)
    np.testing.assert_allclose(prepared, plain, atol=1e-6)
    assert len(layer.weights) == weights and len(layer.trainable_weights) < weights + 1
    kernel = layer.kv_b_proj.kernel
    kernel.assign(kernel * 1.5)
    stale, _ = _decode(layer, x, prefill=3)
    assert not np.allclose(stale, np.asarray(layer(x)), atol=1e-3)  # until prepared again
    layer.prepare_decoding()
    fresh, _ = _decode(layer, x, prefill=3)
    np.testing.assert_allclose(fresh, np.asarray(layer(x)), atol=1e-5)
    # held in float32 (a 16-bit model in `generation.decode_layout`), eager and under XLA
    half = _layer(absorb=True, yarn=True, dtype="bfloat16")
    half.set_weights(layer.get_weights())
    expected, _ = _decode(half, x, prefill=3)
    half.prepare_decoding("float32")
    assert {v.dtype for v in half._absorbed_kernels.values} == {tf.float32}
    wide, _ = _decode(half, x, prefill=3)
    np.testing.assert_allclose(wide, expected, atol=0.05 * np.abs(expected).max())
    step = tf.function(lambda x, cache, i: half(x, cache=cache, cache_index=i), jit_compile=True)
    out, cache = half(x[:, :3], cache=half.init_cache(2, 8), cache_index=0)
    out, _ = step(x[:, 3:4], cache, tf.constant(3, tf.int32))
    np.testing.assert_allclose(
        np.asarray(out, np.float32), wide[:, 3:4], atol=0.05 * np.abs(wide).max()
    )


def test_absorbed_cache_holds_the_normed_latent_and_roped_key_and_masks_the_rest():
    layer = _layer(absorb=True, yarn=True)
    x = np.random.RandomState(3).randn(2, 5, SMALL["d_model"]).astype("float32")
    expected = np.asarray(layer(x))
    cache = layer.init_cache(2, 9)
    rank = SMALL["kv_lora_rank"]
    garbage = np.random.RandomState(4).randn(2, 9, rank).astype("float32") * 100.0
    cache["kv"] = cache["kv"] + garbage  # unwritten slots must be masked out
    out, cache = layer(x, cache=cache, cache_index=0)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)

    kv_a = np.asarray(layer.kv_a_proj_with_mqa(x))
    np.testing.assert_allclose(
        np.asarray(cache["kv"])[:, :5],
        np.asarray(layer.kv_a_layernorm(kv_a[..., :rank])),
        atol=1e-6,
    )
    np.testing.assert_allclose(np.asarray(cache["kv"])[:, 5:], garbage[:, 5:])
    k_pe = np.asarray(layer.rope(kv_a[:, :, None, rank:], np.arange(5, dtype="int32")))
    np.testing.assert_allclose(np.asarray(cache["pe"])[:, :5], k_pe[:, :, 0], atol=1e-6)


def test_cache_values_per_token_at_deepseek_v3_shape():
    v3 = {
        "n_heads": 128,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
    }
    assert mla_cache_values_per_token(**v3, absorb=True) == 576
    assert mla_cache_values_per_token(**v3, absorb=False) == 128 * (192 + 128) == 40960
    for absorb, expected in ((True, 576), (False, 40960)):
        layer = MultiHeadLatentAttention(d_model=7168, q_lora_rank=1536, absorb=absorb, **v3)
        assert not layer.built and not layer.weights  # no 7168-wide weights were made
        assert layer.cache_values_per_token() == expected


def test_yarn_attention_factor_follows_hf():
    assert yarn_attention_factor(1.0, 2.0, 1.0) == 1.0
    assert yarn_attention_factor(40.0, 1.0, 1.0) == pytest.approx(1.0)  # DeepSeek-V3
    assert yarn_attention_factor(40.0, 0.707, 0.707) == pytest.approx(1.0)  # DeepSeek-V2
    mscale = 0.1 * np.log(8.0) + 1.0
    assert yarn_attention_factor(8.0, 2.0, 0.0) == pytest.approx(mscale)
    assert yarn_attention_factor(8.0, 0.0, 1.0) == pytest.approx(mscale)


# --------------------------------------------------------------------------- XLA, bf16


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "naive"])
def test_decode_step_compiles_with_xla(absorb):
    layer = _layer(absorb=absorb, yarn=True)
    x = np.random.RandomState(5).randn(2, 6, SMALL["d_model"]).astype("float32")
    full = np.asarray(layer(x))
    step = tf.function(lambda x, cache, i: layer(x, cache=cache, cache_index=i), jit_compile=True)
    cache = layer.init_cache(2, 8)
    outs = []
    for i in range(6):  # one compiled program for every position (index is a tensor)
        out, cache = step(x[:, i : i + 1], cache, tf.constant(i, tf.int32))
        outs.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "naive"])
def test_mixed_bfloat16_is_finite_and_close_to_float32(absorb):
    fp32 = _layer(absorb=absorb, yarn=True)
    bf16 = _layer(absorb=absorb, yarn=True, dtype=keras.DTypePolicy("mixed_bfloat16"))
    bf16.set_weights(fp32.get_weights())
    x = np.random.RandomState(6).randn(2, 7, SMALL["d_model"]).astype("float32")
    expected = np.asarray(fp32(x))
    out = bf16(x)
    assert out.dtype == tf.bfloat16
    assert bf16.init_cache(1, 4)["kv" if absorb else "k"].dtype == tf.bfloat16
    decoded, _ = _decode(bf16, x, prefill=3)
    for got in (np.asarray(tf.cast(out, tf.float32)), decoded.astype("float32")):
        assert np.all(np.isfinite(got))
        assert _relative_error(got, expected) < 5e-2
