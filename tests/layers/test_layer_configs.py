"""One shared test for every layer: complete get_config, config round trip, save/reload."""

import keras
import numpy as np
import pytest

from deepseek_tf.layers.attention import CausalSelfAttention
from deepseek_tf.layers.causal_conv import CausalConv1D
from deepseek_tf.layers.decoder_block import DecoderBlock
from deepseek_tf.layers.fake_quant_dense import FakeQuantDense
from deepseek_tf.layers.gaussian_head import GaussianHead
from deepseek_tf.layers.low_rank_dense import LowRankDense
from deepseek_tf.layers.mla import MultiHeadLatentAttention
from deepseek_tf.layers.moe import DeepSeekMoE
from deepseek_tf.layers.relative_position_bias import RelativePositionBias
from deepseek_tf.layers.rms_norm import RMSNorm
from deepseek_tf.layers.rotary import RotaryEmbedding
from deepseek_tf.layers.serialization import init_args
from deepseek_tf.layers.swiglu import SwiGLU
from deepseek_tf.models.causal_lm import CausalLM

ATTN = {
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 4,
    "position": "rope+dynamic",
    "bias_buckets": 8,
    "bias_max_distance": 16,
}

# (layer, inputs) with non-default values for as many arguments as practical.
CASES = [
    (lambda: RMSNorm(epsilon=1e-5), lambda: [np.random.randn(2, 3, 8).astype("float32")]),
    (
        lambda: RotaryEmbedding(
            8,
            theta=500.0,
            layout="interleaved",
            scaling_factor=4.0,
            original_max_len=16,
            beta_fast=16.0,
            beta_slow=2.0,
            attention_factor=1.1,
        ),
        lambda: [np.random.randn(1, 5, 2, 8).astype("float32"), np.arange(5, dtype="int32")],
    ),
    (
        lambda: RelativePositionBias(2, num_buckets=8, max_distance=16),
        lambda: [np.arange(3, dtype="int32"), np.arange(5, dtype="int32")],
    ),
    (
        lambda: SwiGLU(8, 24, init_std=0.1, output_init_std=0.05),
        lambda: [np.random.randn(2, 3, 8).astype("float32")],
    ),
    (
        lambda: CausalConv1D(8, kernel_size=4, init_std=0.1),
        lambda: [np.random.randn(2, 5, 8).astype("float32")],
    ),
    (
        lambda: CausalSelfAttention(16, init_std=0.1, output_init_std=0.05, **ATTN),
        lambda: [np.random.randn(2, 5, 16).astype("float32")],
    ),
    (
        lambda: DecoderBlock(
            "hybrid",
            16,
            32,
            ATTN,
            conv_kernel_size=2,
            dropout=0.1,
            norm_eps=1e-5,
            init_std=0.1,
            output_init_std=0.05,
            projection_ranks={"ffn/up_proj": 4, "attention/o_proj": 3},
            fake_quant=True,
        ),
        lambda: [np.random.randn(2, 5, 16).astype("float32")],
    ),
    (
        lambda: LowRankDense(12, 3, init_std=0.1, fake_quant=True),
        lambda: [np.random.randn(2, 5, 16).astype("float32")],
    ),
    (
        lambda: GaussianHead(16, init_log_var=-2.0, seed=3),
        lambda: [np.random.randn(2, 5, 16).astype("float32")],
    ),
    (
        lambda: FakeQuantDense(6, use_bias=False),
        lambda: [np.random.randn(2, 5, 16).astype("float32")],
    ),
    (
        lambda: MultiHeadLatentAttention(
            16,
            n_heads=2,
            q_lora_rank=8,
            kv_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=6,
            rope_theta=500.0,
            rope_layout="half",
            rope_scaling_factor=4.0,
            rope_original_max_len=4,
            yarn_beta_fast=16.0,
            yarn_beta_slow=2.0,
            yarn_mscale=0.9,
            yarn_mscale_all_dim=0.8,
            norm_eps=1e-5,
            absorb=False,
            init_std=0.1,
            output_init_std=0.05,
            projection_ranks={"o_proj": 4},
            fake_quant=True,
        ),
        lambda: [np.random.randn(2, 5, 16).astype("float32")],
    ),
    (
        lambda: DeepSeekMoE(
            16,
            8,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            scoring_func="softmax",
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            routed_scaling_factor=2.0,
            bias_update_speed=0.01,
            seq_aux_loss_alpha=0.1,
            dispatch="dense",
            init_std=0.1,
            output_init_std=0.05,
            tile_size=4,
            fake_quant=True,
        ),
        lambda: [np.random.randn(2, 5, 16).astype("float32")],
    ),
]


def _output(layer, inputs):
    out = layer(*inputs)
    if isinstance(out, tuple):  # GaussianHead: (loc, log_var)
        return np.concatenate([np.asarray(o) for o in out], axis=-1)
    return np.asarray(out["x"] if isinstance(out, dict) else out)


@pytest.mark.parametrize("make_layer,make_inputs", CASES, ids=lambda c: "")
def test_get_config_is_complete_and_round_trips(make_layer, make_inputs):
    layer = make_layer()
    inputs = make_inputs()
    expected = _output(layer, inputs)
    config = layer.get_config()
    missing = set(init_args(type(layer))) - set(config)
    assert not missing, f"{type(layer).__name__}.get_config() lacks {missing}"
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    _output(clone, inputs)  # builds the clone
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(_output(clone, inputs), expected, rtol=1e-5, atol=1e-6)


def test_model_saves_and_reloads_with_equal_outputs(tmp_path, tiny_config):
    from deepseek_tf.models.builder import build_model

    model = build_model(tiny_config, vocab_size=11, seed=3)
    assert isinstance(model, CausalLM)
    ids = np.random.RandomState(0).randint(0, 11, (2, 9)).astype("int32")
    expected = np.asarray(model(ids))
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.get_config() == model.get_config()
    np.testing.assert_allclose(np.asarray(reloaded(ids)), expected, rtol=1e-5, atol=1e-6)
