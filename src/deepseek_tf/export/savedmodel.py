"""SavedModel export through `keras.export.ExportArchive` (loads without deepseek_tf).

Signatures (all token ids are int32, batch and length dynamic):

- `serving_default(token_ids (B, T))` -> `logits (B, T, V)` float32 and
  `next_token (B,)` int32, the argmax of the last position's logits.
- `score(token_ids (B, T))` -> `log_probs (B, T - 1)` float32 where
  `log_probs[:, t] = log p(token_ids[:, t + 1] | token_ids[:, : t + 1])`
  (the first token has no prefix and gets no score).
- `generate(token_ids (B, P), max_new_tokens, temperature, top_k, top_p, seed)`
  (scalars: int32, float32, int32, float32, int32) -> `new_ids (B, N)` int32
  with `N = min(max_new_tokens, max_seq_len - P)`: the one decode loop
  (`generation.decoding.DecodeLoop`, compiled with XLA) laid out by the same rules as
  `Generator` and the server (prefill length, cache length, row `i` sampling with seed
  `seed + i`), so a prompt gives the same tokens through `deepseek-tf generate`, the
  server and this signature. No stop tokens, no sliding window: generation ends at
  the context.
- `generate_text(text (), max_new_tokens, temperature, top_k, top_p, seed)` ->
  `text ()` string, prompt plus continuation, for char-tokenizer runs only
  (lookup tables in the graph; unknown characters map to id 0).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.generation.decoding import CACHE_BUCKET, DecodeLoop
from deepseek_tf.generation.sampler import SEED_MODULUS

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


def _graph_prefill(loop: DecodeLoop, ids, cache, prompt_len):
    """`DecodeLoop.prefill` in the graph: the prompt in `decoding.prefill_chunks` calls
    (powers of two, largest first) -> the last prompt position's logits and the cache."""
    batch = tf.shape(ids)[0]
    top = tf.while_loop(lambda n: n * 2 <= prompt_len, lambda n: (n * 2,), (tf.constant(1),))[0]
    logits = tf.zeros((batch, loop.model.vocab_size), loop.model.compute_dtype)  # (B, V)

    def body(chunk, at, logits, cache):
        take = tf.bitwise.bitwise_and(prompt_len - at, chunk) > 0  # this power is in P
        new_logits, new_cache = tf.cond(
            take,
            lambda: loop.prefill_chunk(ids[:, at : at + chunk], cache, at),
            lambda: (logits, cache),
        )
        new_cache = tf.nest.map_structure(
            lambda n, o: tf.ensure_shape(n, o.shape), new_cache, cache
        )
        new_logits = tf.ensure_shape(new_logits, logits.shape)
        return chunk // 2, tf.where(take, at + chunk, at), new_logits, new_cache

    state = (top, tf.constant(0), logits, cache)
    return tf.while_loop(lambda chunk, *_: chunk > 0, body, state)[2:]


def generate_tokens(loop: DecodeLoop, token_ids, max_new_tokens, temperature, top_k, top_p, seed):
    """The decode loop in the graph: `(B, P)` prompt ids -> `(B, N)` new ids.

    `N = clip(max_new_tokens, 0, max_seq_len - P)`; the layout is `Decoder.start`'s
    (prefill chunks, cache length; rows are not padded), row `i` samples with `seed + i`.
    """
    model = loop.model
    batch, prompt_len = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
    steps = tf.clip_by_value(max_new_tokens, 0, model.max_seq_len - prompt_len)
    total = prompt_len + steps
    bucket = CACHE_BUCKET
    cache_len = tf.minimum((total + bucket - 1) // bucket * bucket, model.max_seq_len)
    ids = tf.pad(token_ids, [[0, 0], [0, cache_len - prompt_len]])  # (B, S)
    is_prompt = tf.broadcast_to(tf.range(cache_len)[None, :] < prompt_len, tf.shape(ids))
    cache = model.init_cache(batch, cache_len)  # per layer: (B, S, ...)
    logits, cache = _graph_prefill(loop, ids, cache, prompt_len)
    rows = tf.range(batch, dtype=tf.int32)
    seeds = tf.math.floormod(tf.cast(seed, tf.int64) + tf.cast(rows, tf.int64), SEED_MODULUS)
    sampling = (
        tf.fill((batch,), tf.cast(temperature, tf.float32)),
        tf.fill((batch,), tf.cast(top_k, tf.int32)),
        tf.fill((batch,), tf.cast(top_p, tf.float32)),
        tf.cast(seeds, tf.int32),
    )
    out = loop.decode(
        ids,
        is_prompt,
        cache,
        logits,
        tf.fill((batch,), prompt_len),
        steps,
        tf.fill((batch,), total),
        tf.zeros((batch,), tf.bool),
        sampling,
        tf.constant([-1], tf.int32),
    )
    return out[2][:, prompt_len:total]  # (B, N)


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

    vocab = None if tokenizer is None else tokenizer.vocab_size  # ids the tokenizer decodes
    loop = DecodeLoop(model, jit_compile=True, vocab_limit=vocab)

    def generate(token_ids, max_new_tokens, temperature, top_k, top_p, seed):
        new = generate_tokens(loop, token_ids, max_new_tokens, temperature, top_k, top_p, seed)
        return {"new_ids": new}

    archive.add_endpoint("serving_default", serve, input_signature=[IDS_SPEC])
    archive.add_endpoint("score", score, input_signature=[IDS_SPEC])
    archive.add_endpoint("generate", generate, input_signature=[IDS_SPEC, *SAMPLING_SPECS])

    chars = tokenizer.char_table if tokenizer is not None else None
    if chars is not None:  # one character per token: the tokenizer fits in two tables
        tables = _CharTables(chars)
        archive.track(tables)

        def generate_text(text, max_new_tokens, temperature, top_k, top_p, seed):
            ids = tables.encode(text)  # (1, P)
            new = generate_tokens(loop, ids, max_new_tokens, temperature, top_k, top_p, seed)
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
    if tokenizer is not None and tokenizer.char_table is not None:
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
