"""Kernels held (out, in) for decoding: the same function, the same tokens, and back."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config.loader import load_config
from deepseek_tf.generation import decode_layout
from deepseek_tf.generation.decoder import Decoder, Row
from deepseek_tf.layers.moe import DeepSeekMoE
from deepseek_tf.models.builder import build_model
from deepseek_tf.training.checkpoint import RunCheckpoint


def tiny(dtype="bfloat16", preset="tiny-moe"):
    """`tiny-moe`: MLA with q-LoRA, a dense layer, then DeepSeekMoE (the 1.46B
    demonstration's kinds of weight); `tiny`: multi-head attention and SwiGLU; in `dtype`."""
    return build_model(load_config(preset), vocab_size=40, seed=3, dtype=dtype)


def weights_by_path(model):
    return {v.path: np.asarray(tf.cast(v.value, tf.float32)) for v in model.weights}


def greedy(decoder, prompts, n):
    state = decoder.start([Row(p, n) for p in prompts])
    out = [[] for _ in prompts]
    while not state.finished:
        for i, new in enumerate(state.step()):
            out[i] += [entry[0] for entry in new]
    return out


def test_the_layout_computes_the_same_and_restores_every_weight_exactly(tmp_path):
    model = tiny()
    ids = np.random.default_rng(0).integers(0, 40, (2, 12))  # 48 assignments: capacity
    reference = np.asarray(tf.cast(model(ids), tf.float32))
    before = weights_by_path(model)
    moved = decode_layout.apply(model)
    assert decode_layout.applied(model) and moved > 0
    assert decode_layout.apply(model) == 0  # once
    heads = model.lm_head
    assert tuple(heads.kernel.shape) == (40, 32)  # (out, in)
    moe = next(la for la in model._flatten_layers() if isinstance(la, DeepSeekMoE))
    assert tuple(moe.experts_gate.shape) == (8, 16, 32)  # (E, h, d)
    assert sorted(weights_by_path(model)) == sorted(before)  # the same variables, by name
    np.testing.assert_allclose(
        np.asarray(tf.cast(model(ids), tf.float32)), reference, atol=0.02 * np.abs(reference).max()
    )
    with pytest.raises(ValueError, match="decode layout"):  # a square kernel would pass
        RunCheckpoint(tmp_path, model).save(1)
    assert decode_layout.restore(model) == moved and not decode_layout.applied(model)
    RunCheckpoint(tmp_path, model).save(1)
    after = weights_by_path(model)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    np.testing.assert_array_equal(np.asarray(tf.cast(model(ids), tf.float32)), reference)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny"])
def test_batch_one_steps_under_xla_give_plain_decodings_tokens(preset):
    """A model read from memory (`cache_bytes=1`) in the layout decodes batch 1 with its
    step under XLA (routed experts one by one) and larger batches with TensorFlow's
    kernels: both give the tokens of the model in its own layout."""
    from deepseek_tf.generation.memory_bound import accelerated

    if accelerated():
        pytest.skip("an accelerator is present: decoding follows jit_compile there")
    model = tiny(preset=preset)
    prompts = [[1, 5, 9, 2], [7, 3]]
    plain = Decoder(model, cache_bytes=1)
    assert not plain.loop.xla_step
    expected = greedy(plain, prompts, 10) + [greedy(plain, prompts[:1], 10)[0]]
    decode_layout.apply(model)
    laid_out = Decoder(model, cache_bytes=1)
    assert laid_out.loop.xla_step and not laid_out.loop.jit_compile
    assert greedy(laid_out, prompts[:1], 10)[0] == expected[2]  # batch 1: the XLA step
    assert laid_out.loop._xla_token_step.experimental_get_tracing_count() == 1
    assert greedy(laid_out, prompts, 10) == expected[:2]  # batch 2: TensorFlow's kernels


def test_routed_experts_held_out_in_multiply_one_by_one_under_xla():
    """One token under XLA (batch-1 decoding) runs each routed expert on its own against
    stacks held `(E, out, in)`: the layer's output is the plain layer's."""
    moe = next(la for la in tiny()._flatten_layers() if isinstance(la, DeepSeekMoE))
    x = tf.cast(np.random.default_rng(1).normal(size=(1, 1, 32)), "bfloat16")  # (B, T, d)

    def routed(layer):
        return np.asarray(tf.cast(layer(x)["x"], tf.float32))

    reference = routed(moe)
    assert moe.transpose_stacks() and moe.stacks_out_in
    xla = tf.function(lambda: moe(x)["x"], jit_compile=True)
    np.testing.assert_allclose(
        np.asarray(tf.cast(xla(), tf.float32)), reference, atol=0.02 * np.abs(reference).max()
    )
    assert moe.transpose_stacks() and not moe.stacks_out_in


def test_the_layout_is_wanted_for_16_bit_weights_read_from_memory_on_a_cpu():
    from deepseek_tf.generation.memory_bound import accelerated, weight_bytes

    if accelerated():
        pytest.skip("an accelerator is present")
    half, full = tiny(), tiny("float32")
    size = weight_bytes(half)
    assert decode_layout.wanted(half, cache_bytes=size - 1)
    assert not decode_layout.wanted(half, cache_bytes=size)  # held in cache
    assert not decode_layout.wanted(full, cache_bytes=1)  # float32: XLA's loop as it was
