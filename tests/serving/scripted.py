"""A real model whose greedy reply is a script: after token `chain[i]` comes `chain[i + 1]`.

Every weight is zero except the embedding rows of the chain's tokens (one-hot: row
`chain[i]` is the unit vector `i`) and an untied output head that maps unit vector `i` to
`chain[i + 1]`. The blocks then add nothing to the residual stream, so each position's
logits depend on its own token alone: a bigram table. Serving tests use it to make the
model write exact text (DeepSeek's tool-call tokens, a stop string) without training.
"""

from __future__ import annotations

import numpy as np

from deepseek_tf.config.loader import update_config
from deepseek_tf.models.builder import build_model


def scripted_model(config, vocab_size: int, chain: list[int]):
    """`config`'s model (with an untied head, `vocab_size` rows) scripted to continue `chain`.

    Args:
        config: a run config whose `model.d_model` is at least `len(chain) - 1`.
        vocab_size: the tokenizer's vocabulary size.
        chain: token ids; `chain[:-1]` must be distinct (each picks one successor).
    """
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError("the chain's tokens (but the last) must be distinct")
    changes = {"tie_embeddings": False, "mtp_depth": 0, "vocab_size": vocab_size}
    config = update_config(config, model=changes)
    width = config.model.d_model
    if len(chain) - 1 > width:
        raise ValueError(f"a chain of {len(chain)} tokens needs d_model >= {len(chain) - 1}")
    model = build_model(config)
    for variable in model.weights:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    table = np.zeros((model.vocab_size, width), np.float32)  # (V, C)
    head = np.zeros((width, model.vocab_size), np.float32)  # (C, V)
    for i, (token, after) in enumerate(zip(chain[:-1], chain[1:])):
        table[token, i] = 1.0
        head[i, after] = 10.0
    model.embedding.embeddings.assign(table)
    model.final_norm.scale.assign(np.ones(width, np.float32))
    model.lm_head.kernel.assign(head)
    return model
