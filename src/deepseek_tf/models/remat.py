"""One decoder block of a training forward pass, optionally rematerialised."""

from __future__ import annotations

import tensorflow as tf


def run_block(block, x, training, remat: str = "none") -> dict:
    """`block(x, return_hidden=True)`; with `remat="blocks"` while training, its
    activations are recomputed in the backward pass (`tf.recompute_grad`) instead of
    kept: less memory for more compute.

    Args:
        block: a `DecoderBlock`.
        x: `(B, T, C)` block input.
        training: enables dropout (and remat).
        remat: `"blocks"` or `"none"` (`CausalLM.remat`).

    Returns:
        The block's output dict (`"x"`, `"hidden"`, and a MoE's statistics).

    Examples:
    >>> from deepseek_tf.layers.decoder_block import DecoderBlock
    >>> block = DecoderBlock("attention", 8, 16, {"n_heads": 2, "n_kv_heads": 2, "head_dim": 4})
    >>> sorted(run_block(block, tf.ones((1, 3, 8)), training=False))
    ['hidden', 'x']
    """

    def run(h):
        return block(h, training=training, return_hidden=True)

    if remat == "blocks" and training:
        # Activations recomputed in backward. tf.recompute_grad orders the recompute
        # after the backward pass reaches it through a data dependency on the gradient
        # of its *first* output only. That must be "x": the hidden activations get no
        # gradient (zeros made up front), and with them first (as a dict's sorted keys
        # put them) the recompute is free to run during the forward pass and every
        # activation stays alive -- measured: no memory saved at all.
        keys = []

        def run_flat(h):
            out = run(h)
            keys[:] = ["x", *sorted(k for k in out if k != "x")]
            return tuple(out[k] for k in keys)

        values = tf.recompute_grad(run_flat)(x)
        return dict(zip(keys, values))
    return run(x)
