"""int8 / int4 weight-only routed experts: codes and scales, and the quantized MoE paths."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers import expert_quant
from deepseek_tf.layers.moe import DeepSeekMoE
from deepseek_tf.models.quantization import inputs_first, quantization_config

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(("mode", "levels"), [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("group_size", [-1, 4])
def test_round_trip_error_is_half_a_step(mode, levels, group_size):
    w = RNG.normal(size=(3, 12, 5)).astype(np.float32)  # (E, I, O)
    codes, scale = expert_quant.quantize(w, mode, group_size)
    shapes = expert_quant.stored_shapes(w.shape, mode, group_size)
    assert codes.shape == shapes["codes"] and codes.dtype == np.int8
    assert scale.shape == shapes["scale"]
    back = np.asarray(expert_quant.dequantize(codes, scale, mode, 12, "float32"))
    g = expert_quant.n_groups(12, group_size)
    step = np.abs(w.reshape(3, g, -1, 5)).max(axis=2, keepdims=True) / levels  # per group
    err = np.abs(back - w).reshape(3, g, -1, 5)
    assert np.all(err <= step / 2 + 1e-6)
    assert mode != "int4" or codes.shape[1] == 6  # two 4-bit codes per byte


def test_int4_odd_input_width_packs_and_unpacks():
    w = RNG.normal(size=(2, 7, 3)).astype(np.float32)
    codes, scale = expert_quant.quantize(w, "int4", -1)
    assert codes.shape == (2, 4, 3)
    back = np.asarray(expert_quant.dequantize(codes, scale, "int4", 7, "float32"))
    assert back.shape == w.shape and np.abs(back - w).max() < np.abs(w).max() / 7


def test_gathered_dequantize_equals_full():
    w = RNG.normal(size=(4, 8, 6)).astype(np.float32)
    codes, scale = expert_quant.quantize(w, "int4", 4)
    full = np.asarray(expert_quant.dequantize(codes, scale, "int4", 8, "float32"))
    idx = np.array([3, 0, 3])
    part = expert_quant.dequantize(codes[idx], scale[idx], "int4", 8, "float32")
    np.testing.assert_array_equal(np.asarray(part), full[idx])


def _moe(dispatch="sparse", **kwargs):
    keras.utils.set_random_seed(3)
    layer = DeepSeekMoE(
        16, 32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        dispatch=dispatch, **kwargs,
    )  # fmt: skip
    layer.build((None, 16))
    return layer


@pytest.mark.parametrize(
    ("mode", "group_size", "tolerance"), [("int8", -1, 0.02), ("int4", 8, 0.15)]
)
@pytest.mark.parametrize("tokens", [3, 256], ids=["tiles", "capacity"])
def test_quantized_sparse_equals_quantized_dense_and_stays_near_float(
    mode, group_size, tolerance, tokens
):
    x = RNG.normal(size=(1, tokens, 16)).astype(np.float32)
    sparse = _moe()
    reference = np.asarray(sparse(x)["x"])
    sparse.quantize_experts(mode, group_size)
    dense = DeepSeekMoE.from_config({**sparse.get_config(), "dispatch": "dense"})
    dense.build((None, 16))
    dense.set_weights(sparse.get_weights())
    got = np.asarray(sparse(x)["x"])
    np.testing.assert_allclose(got, np.asarray(dense(x)["x"]), atol=1e-5)
    err = np.abs(got - reference).max() / np.abs(reference).max()
    assert 0 < err < tolerance


def test_quantized_experts_are_stored_packed_and_not_trained():
    def routed_bytes(layer):
        return sum(v.numpy().nbytes for v in layer.weights if "/experts_" in v.path)

    layer = _moe()
    float_bytes = routed_bytes(layer)
    layer.quantize_experts("int4", -1)
    names = {v.path.split("/")[-1] for v in layer.weights}
    assert {"experts_up_codes", "experts_up_scale"} <= names and "experts_up" not in names
    assert not any("codes" in v.path or "scale" in v.path for v in layer.trainable_weights)
    assert layer.get_config()["expert_quantize"] == "int4"
    assert routed_bytes(layer) < float_bytes / 5  # 4 bits + a float32 scale per column
    assert layer.prunable_units() == []


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="expert_quantize must be one of"):
        DeepSeekMoE(16, 32, n_routed_experts=4, expert_quantize="int3")
    with pytest.raises(ValueError, match="expert_group_size: 5 must be -1"):
        _moe().quantize_experts("int8", 5)
    layer = _moe(expert_quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize_experts("int8")


def waiting_int8_reads(fn, spec) -> int:
    """int8 tensors (codes) in `fn`'s graph read under a control dependency."""
    graph = tf.function(fn).get_concrete_function(spec).graph
    ops_ = [op for op in graph.get_operations() if op.control_inputs and op.outputs]
    return sum(op.outputs[0].dtype == tf.int8 for op in ops_)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_a_whole_stack_is_dequantized_only_once_the_layer_is_reached(dispatch):
    """Weight-only work depends on no input: without a control dependency on the layer's
    input, TensorFlow's executor dequantizes every layer's stacks when a program starts."""
    moe = DeepSeekMoE(8, 16, n_routed_experts=4, n_shared_experts=0, num_experts_per_tok=2,
                      expert_quantize="int8", dispatch=dispatch)  # fmt: skip
    moe.build((1, 16, 8))  # 16 tokens x 2 >= 4 per expert: the capacity dispatch
    spec = tf.TensorSpec((1, 16, 8), tf.float32)
    assert waiting_int8_reads(lambda x: moe(x)["x"], spec) == 3  # gate, up and down codes


def test_a_quantized_projection_unpacks_only_once_its_input_is_ready():
    layer = keras.layers.Dense(6, use_bias=False)
    layer.build((None, 10))
    layer.quantize("int4", config=quantization_config("int4", 4, -1))
    spec = tf.TensorSpec((2, 10), tf.float32)
    assert waiting_int8_reads(layer, spec) == 0
    x = np.random.default_rng(0).normal(size=(2, 10)).astype("float32")
    want = np.asarray(layer(x))
    inputs_first(layer)
    assert waiting_int8_reads(layer, spec) >= 1
    np.testing.assert_array_equal(np.asarray(layer(x)), want)
