"""Per-row cache positions (a continuous batch) equal each row's own full forward."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config.loader import apply_overrides
from deepseek_tf.models.builder import build_model

VOCAB = 29
VARIANTS = {
    "mha-rope": ["model.position=rope"],
    "gqa-dynamic": ["model.position=dynamic", "model.n_kv_heads=1"],
    "rope+dynamic-hybrid": ["model.position=rope+dynamic", "model.blocks=[attention,hybrid]"],
    "mla-absorbed": ["model.attention=mla", "model.position=rope"],
    "mla-naive": ["model.attention=mla", "model.position=rope", "model.mla_absorb=false"],
}


def _stack_rows(caches):
    """Per-row batch-1 caches -> one batch cache (every leaf concatenated on axis 0)."""
    return tf.nest.map_structure(lambda *leaves: tf.concat(leaves, 0), *caches)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rows_at_different_positions_match_full_forward(tiny_config, variant):
    config = apply_overrides(tiny_config, ["model.init_std=0.2", *VARIANTS[variant]])
    model = build_model(config, vocab_size=VOCAB, seed=0)
    rng = np.random.RandomState(1)
    lengths = [3, 9, 6]  # each row's prompt, prefilled on its own
    seqs = [rng.randint(0, VOCAB, (n + 3,)).astype("int32") for n in lengths]
    caches = []
    for seq, n in zip(seqs, lengths):
        _, cache = model.call_with_cache(seq[None, :n], model.init_cache(1, 16), 0)
        caches.append(cache)
    cache = _stack_rows(caches)
    positions = tf.constant(lengths, tf.int32)  # (B,)
    # one token per row, then two per row (a speculative verify), each at its own position
    step = np.stack([s[n : n + 1] for s, n in zip(seqs, lengths)])  # (B, 1)
    one, cache = model.call_with_cache(step, cache, positions)
    step = np.stack([s[n + 1 : n + 3] for s, n in zip(seqs, lengths)])  # (B, 2)
    two, cache = model.call_with_cache(step, cache, positions + 1)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        full = np.asarray(model(seq[None, : n + 3]))[0]  # (n + 3, V)
        np.testing.assert_allclose(np.asarray(one)[row, 0], full[n], atol=1e-4)
        np.testing.assert_allclose(np.asarray(two)[row], full[n + 1 : n + 3], atol=1e-4)


def test_per_row_step_compiles_with_xla(tiny_config):
    config = apply_overrides(tiny_config, ["model.attention=mla", "model.position=rope"])
    model = build_model(config, vocab_size=VOCAB, seed=0)
    step = tf.function(model.call_with_cache, jit_compile=True)
    cache = model.init_cache(2, 8)
    ids = tf.constant([[1], [2]], tf.int32)
    eager, _ = model.call_with_cache(ids, cache, tf.constant([0, 5]))
    compiled, _ = step(ids, cache, tf.constant([0, 5]))
    np.testing.assert_allclose(np.asarray(compiled), np.asarray(eager), atol=1e-5)
