"""SavedModel export through `keras.export.ExportArchive` (loads without deepseek_tf).

Signatures (all token ids are int32, batch and length dynamic):

- `serving_default(token_ids (B, T))` -> `logits (B, T, V)` float32 and
  `next_token (B,)` int32, the argmax of the last position's logits.
- `score(token_ids (B, T))` -> `log_probs (B, T - 1)` float32 where
  `log_probs[:, t] = log p(token_ids[:, t + 1] | token_ids[:, : t + 1])`
  (the first token has no prefix and gets no score).
- `generate(token_ids (B, P), max_new_tokens, temperature, top_k, top_p, seed)`
  (scalars: int32, float32, int32, float32, int32) -> `new_ids (B, N)` int32
  with `N = min(max_new_tokens, max_seq_len - P)`: prefill plus a KV-cached
  `tf.while_loop` with a cache of `max_seq_len` positions, sampling with
  `sample_next` exactly as `Generator` does (same per-step seeds), so a batch
  of equal-length prompts gives the same tokens. No stop tokens, no sliding
  window: generation ends at the context.
- `generate_text(text (), max_new_tokens, temperature, top_k, top_p, seed)` ->
  `text ()` string, prompt plus continuation, for char-tokenizer runs only
  (lookup tables in the graph; unknown characters map to id 0).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.generation.sampler import sample_next

NOTES = (
    "all block types (attention, hybrid conv), MHA/GQA, MLA and MoE export; MTP modules "
    "(training only) are not exported; generate: no stop ids, ends at the context"
)
IDS_SPEC = tf.TensorSpec([None, None], tf.int32, name="token_ids")
SAMPLING_SPECS = [
    tf.TensorSpec([], tf.int32, name="max_new_tokens"),
    tf.TensorSpec([], tf.float32, name="temperature"),
    tf.TensorSpec([], tf.int32, name="top_k"),
    tf.TensorSpec([], tf.float32, name="top_p"),
    tf.TensorSpec([], tf.int32, name="seed"),
]


def score_tokens(model, token_ids):
    """Log-probability of each next token: `(B, T)` ids -> `(B, T - 1)` float32."""
    logits = model(token_ids, training=False)[:, :-1, :]  # (B, T - 1, V)
    log_probs = tf.nn.log_softmax(logits, axis=-1)  # (B, T - 1, V)
    targets = token_ids[:, 1:]  # (B, T - 1)
    return tf.gather(log_probs, targets, axis=-1, batch_dims=2)  # (B, T - 1)


def generate_tokens(model, token_ids, max_new_tokens, temperature, top_k, top_p, seed):
    """KV-cached decoding in the graph: `(B, P)` prompt ids -> `(B, N)` new ids.

    `N = clip(max_new_tokens, 0, max_seq_len - P)`. The cache holds
    `max_seq_len` positions; step `i` samples the token at position `P + i`
    with seed `(seed, P + i)`, as `Generator` does.
    """
    batch, prompt_len = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
    max_len = model.max_seq_len
    steps = tf.clip_by_value(max_new_tokens, 0, max_len - prompt_len)
    cache = model.init_cache(batch, max_len)  # per layer: (B, S, ...) with S = max_seq_len
    logits, cache = model.call_with_cache(token_ids, cache, tf.constant(0, tf.int32))
    logits = logits[:, -1, :]  # (B, V)
    out = tf.zeros((batch, max_len), tf.int32)  # (B, S), new tokens in [:, :steps]

    def cond(i, out, cache, logits):
        return i < steps

    def body(i, out, cache, logits):
        position = prompt_len + i
        token = sample_next(logits, temperature, top_k, top_p, tf.stack([seed, position]))  # (B,)
        out = tf.tensor_scatter_nd_update(
            out, tf.stack([tf.range(batch), tf.fill((batch,), i)], axis=1), token
        )
        step_logits, cache = model.call_with_cache(token[:, None], cache, position)
        return i + 1, out, cache, step_logits[:, -1, :]

    _, out, _, _ = tf.while_loop(cond, body, (tf.constant(0, tf.int32), out, cache, logits))
    return out[:, :steps]  # (B, N)


class _CharTables(tf.Module):
    """In-graph char tokenizer: code point <-> id lookup tables."""

    def __init__(self, chars):
        super().__init__()
        codes = tf.constant([ord(c) for c in chars], tf.int32)
        ids = tf.range(len(chars), dtype=tf.int32)
        self.encode_table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(codes, ids), default_value=0
        )
        self.codes = tf.Variable(codes, trainable=False, name="char_codes")

    def encode(self, text):
        """Scalar string -> `(1, T)` int32 ids."""
        codes = tf.strings.unicode_decode(text, "UTF-8")  # (T,)
        return self.encode_table.lookup(codes)[None, :]

    def decode(self, ids):
        """`(T,)` ids -> scalar string."""
        return tf.strings.unicode_encode(tf.gather(self.codes, ids), "UTF-8")


def build_archive(model, tokenizer=None) -> keras.export.ExportArchive:
    """An `ExportArchive` with the signatures of this module's docstring."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(token_ids):
        logits = model(token_ids, training=False)  # (B, T, V)
        next_token = tf.argmax(logits[:, -1, :], axis=-1, output_type=tf.int32)  # (B,)
        return {"logits": logits, "next_token": next_token}

    def score(token_ids):
        return {"log_probs": score_tokens(model, token_ids)}

    def generate(token_ids, max_new_tokens, temperature, top_k, top_p, seed):
        new = generate_tokens(model, token_ids, max_new_tokens, temperature, top_k, top_p, seed)
        return {"new_ids": new}

    archive.add_endpoint("serving_default", serve, input_signature=[IDS_SPEC])
    archive.add_endpoint("score", score, input_signature=[IDS_SPEC])
    archive.add_endpoint("generate", generate, input_signature=[IDS_SPEC, *SAMPLING_SPECS])

    if tokenizer is not None and getattr(tokenizer, "kind", None) == "char":
        tables = _CharTables(tokenizer.chars)
        archive.track(tables)

        def generate_text(text, max_new_tokens, temperature, top_k, top_p, seed):
            ids = tables.encode(text)  # (1, P)
            new = generate_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, seed)
            return {"text": text + tables.decode(new[0])}

        text_spec = tf.TensorSpec([], tf.string, name="text")
        archive.add_endpoint(
            "generate_text", generate_text, input_signature=[text_spec, *SAMPLING_SPECS]
        )
    return archive


def export_savedmodel(model, out_dir, tokenizer=None, *, verify: bool = True, seed: int = 0):
    """Writes the SavedModel to `out_dir`; returns a report dict.

    With `verify`, reloads the directory with `tf.saved_model.load` and
    compares `serving_default` logits with the Keras model on random prompts
    (`report["max_abs_logit_diff"]`) and `generate` (greedy) with the eager
    cached decoding.
    """
    archive = build_archive(model, tokenizer)
    archive.write_out(str(out_dir), verbose=False)
    report = {
        "format": "savedmodel",
        "path": str(out_dir),
        "signatures": ["serving_default", "score", "generate"],
        "notes": NOTES,
    }
    if tokenizer is not None and getattr(tokenizer, "kind", None) == "char":
        report["signatures"].append("generate_text")
    if verify:
        report.update(verify_savedmodel(model, out_dir, seed=seed))
    return report


def verify_savedmodel(model, out_dir, *, seed: int = 0, batch: int = 2, length: int = 12):
    """Max abs logit diff of the reloaded `serving_default` against the Keras model."""
    rng = np.random.default_rng(seed)
    length = min(length, model.max_seq_len)
    ids = rng.integers(0, model.vocab_size, (batch, length)).astype(np.int32)
    loaded = tf.saved_model.load(str(out_dir))
    exported = loaded.signatures["serving_default"](token_ids=tf.constant(ids))["logits"]
    reference = model(ids, training=False)
    diff = float(np.max(np.abs(exported.numpy() - np.asarray(reference))))
    return {"max_abs_logit_diff": diff}
