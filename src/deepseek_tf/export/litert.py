"""LiteRT (TFLite) export: fixed-shape prefill and decode signatures, builtin ops only.

Dynamic-length causal attention needs SELECT_TF_OPS, which the `ai_edge_litert`
interpreter cannot run, so the model is exported with fixed shapes and an
explicit KV cache (batch 1, cache of `max_seq_len` positions):

- `prefill(token_ids (1, P))` -> `logits (1, P, V)` and the cache tensors
  after the `P` prompt tokens (`P` = `prefill_len`).
- `decode(token_ids (1, 1), cache_index (), cache...)` -> `logits (1, 1, V)` and
  the updated cache tensors; `cache_index` is the position of the token.

Cache tensors are named `cache_<layer>_<key>` (e.g. `cache_0_k`, `cache_1_conv`),
in `cache_names(model)` order. A prompt of exactly `P` tokens (or longer: the
rest goes through `decode`) uses `prefill`; shorter prompts are fed token by
token through `decode` (right-padding would corrupt the hybrid blocks' conv
state). `LiteRTRunner` does this.
"""

from __future__ import annotations

import tempfile

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.errors import InputError
from deepseek_tf.generation.sampler import check_sampling, limit_vocab, sample_tokens

NOTES = (
    "batch 1, fixed shapes, TFLITE_BUILTINS only; MHA/GQA, MLA, MoE and hybrid conv blocks "
    "convert; sampling runs outside the graph (LiteRTRunner.generate, the one sampler)"
)


def cache_names(model) -> list[tuple[int, str]]:
    """`(layer, key)` of every cache tensor, in signature order."""
    cache = model.init_cache(1, 1)
    return [(i, key) for i, layer in enumerate(cache) for key in sorted(layer)]


def _cache_specs(model):
    cache = model.init_cache(1, model.max_seq_len)
    return {
        f"cache_{i}_{key}": tf.TensorSpec(
            cache[i][key].shape, cache[i][key].dtype, name=f"cache_{i}_{key}"
        )
        for i, key in cache_names(model)
    }


def _flatten(model, cache) -> dict:
    return {f"cache_{i}_{key}": cache[i][key] for i, key in cache_names(model)}


def _unflatten(model, flat) -> list:
    cache = [{} for _ in range(model.n_layers)]
    for i, key in cache_names(model):
        cache[i][key] = flat[f"cache_{i}_{key}"]
    return cache


def _archive(model, prefill_len: int):
    """An `ExportArchive` with fixed-shape `prefill` and `decode` endpoints.

    (Converting a `tf.Module` holding the Keras model leaves uninitialised
    resource variables in the flatbuffer; the archive's SavedModel does not.)
    """

    def prefill(token_ids):
        cache = model.init_cache(1, model.max_seq_len)
        logits, cache = model.call_with_cache(token_ids, cache, tf.constant(0, tf.int32))
        return {"logits": logits, **_flatten(model, cache)}  # logits (1, P, V)

    def decode(token_ids, cache_index, cache):
        logits, cache = model.call_with_cache(token_ids, _unflatten(model, cache), cache_index)
        return {"logits": logits, **_flatten(model, cache)}  # logits (1, 1, V)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "prefill",
        prefill,
        input_signature=[tf.TensorSpec([1, prefill_len], tf.int32, name="token_ids")],
    )
    archive.add_endpoint(
        "decode",
        decode,
        input_signature=[
            tf.TensorSpec([1, 1], tf.int32, name="token_ids"),
            tf.TensorSpec([], tf.int32, name="cache_index"),
            _cache_specs(model),
        ],
    )
    return archive


def convert_litert(model, prefill_len: int, int8: bool = False) -> bytes:
    """The `.tflite` flatbuffer with `prefill` and `decode` signatures (TFLITE_BUILTINS)."""
    if not 1 <= prefill_len <= model.max_seq_len:
        raise InputError(
            f"prefill length {prefill_len} is outside [1, {model.max_seq_len}] (the context)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        _archive(model, prefill_len).write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=["prefill", "decode"]
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if int8:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic-range int8 weights
        return converter.convert()


class LiteRTRunner:
    """Runs an exported `.tflite` model with the `ai_edge_litert` interpreter.

    Args:
        path: the `.tflite` file.
    """

    def __init__(self, path):
        from ai_edge_litert.interpreter import Interpreter  # the optional [export] extra

        self.interpreter = Interpreter(model_path=str(path))
        self._prefill = self.interpreter.get_signature_runner("prefill")
        self._decode = self.interpreter.get_signature_runner("decode")
        prefill_inputs = self._prefill.get_input_details()
        self.prefill_len = int(next(iter(prefill_inputs.values()))["shape"][1])
        decode_inputs = self._decode.get_input_details()
        self.cache_keys = sorted(k for k in decode_inputs if k not in ("cache_index", "token_ids"))
        self._zero_cache = {
            k: np.zeros(decode_inputs[k]["shape"], decode_inputs[k]["dtype"])
            for k in self.cache_keys
        }
        self.max_len = int(decode_inputs[self.cache_keys[0]]["shape"][1])

    def logits(self, ids) -> np.ndarray:
        """Logits `(T, V)` of a 1-D prompt (prefill when long enough, then decode)."""
        ids = [int(t) for t in ids]
        if not 0 < len(ids) <= self.max_len:
            raise InputError(f"prompt of {len(ids)} tokens: need 1..{self.max_len}")
        rows, cache, start = [], dict(self._zero_cache), 0
        if len(ids) >= self.prefill_len:
            out = self._prefill(token_ids=np.asarray([ids[: self.prefill_len]], np.int32))
            rows.append(out["logits"][0])
            cache = {k: out[k] for k in self.cache_keys}
            start = self.prefill_len
        for position in range(start, len(ids)):
            out = self._decode(
                token_ids=np.asarray([[ids[position]]], np.int32),
                cache_index=np.asarray(position, np.int32),
                **cache,
            )
            rows.append(out["logits"][0])
            cache = {k: out[k] for k in self.cache_keys}
        self._cache, self._length = cache, len(ids)
        return np.concatenate(rows, axis=0)

    def generate(
        self,
        ids,
        max_new_tokens: int,
        *,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        vocab_limit: int | None = None,
    ) -> list[int]:
        """Continuation of a 1-D prompt (stops at the context), sampled with the one
        sampler of every decoding path (`sampler.sample_tokens`, keyed by seed and
        position), so it picks what `deepseek-tf generate` picks from the same logits;
        `vocab_limit`: the tokenizer's size (see `sampler.limit_vocab`)."""
        sampling = check_sampling(temperature, top_k, top_p, seed)
        settings = (
            tf.constant([sampling.temperature], tf.float32),
            tf.constant([sampling.top_k], tf.int32),
            tf.constant([sampling.top_p], tf.float32),
            tf.constant([sampling.seed], tf.int32),
        )
        logits = self.logits(ids)[-1]
        new = []
        while len(new) < max_new_tokens and self._length < self.max_len:
            position = tf.constant(self._length, tf.int32)
            allowed = limit_vocab(tf.constant(logits[None, :]), vocab_limit)
            token = int(sample_tokens(allowed, *settings, position)[0])
            new.append(token)
            out = self._decode(
                token_ids=np.asarray([[token]], np.int32),
                cache_index=np.asarray(self._length, np.int32),
                **self._cache,
            )
            self._cache = {k: out[k] for k in self.cache_keys}
            self._length += 1
            logits = out["logits"][0, -1]
        return new


def export_litert(
    model,
    out_path,
    *,
    prefill_len: int | None = None,
    int8: bool = False,
    verify: bool = True,
    seed: int = 0,
) -> dict:
    """Writes the `.tflite` file; verifies it with `ai_edge_litert` when installed.

    `prefill_len` defaults to `min(16, max_seq_len)`; with `int8`, weights are
    stored as int8 (dynamic-range quantisation; activations stay float32).
    """
    prefill_len = prefill_len or min(16, model.max_seq_len)
    if verify:  # never report success on a file nothing has checked
        try:
            import ai_edge_litert  # noqa: F401
        except ImportError:
            raise InputError(
                "cannot verify the LiteRT file: ai_edge_litert is not installed "
                "(pip install 'deepseek-tf[export]'), or pass --no-verify"
            ) from None
    flatbuffer = convert_litert(model, prefill_len, int8)
    with open(out_path, "wb") as f:
        f.write(flatbuffer)
    report = {
        "format": "litert",
        "path": str(out_path),
        "signatures": ["prefill", "decode"],
        "prefill_len": prefill_len,
        "int8": int8,
        "bytes": len(flatbuffer),
        "notes": NOTES,
    }
    if not verify:
        report["verified"] = "no (--no-verify)"
        return report
    report.update(verify_litert(model, out_path, prefill_len, seed=seed))
    return report


def verify_litert(model, path, prefill_len: int, *, seed: int = 0) -> dict:
    """Max abs logit diff against the Keras model on one random prompt."""
    rng = np.random.default_rng(seed)
    length = min(prefill_len + 3, model.max_seq_len)
    ids = rng.integers(0, model.vocab_size, (length,)).astype(np.int32)
    got = LiteRTRunner(path).logits(ids)  # (T, V)
    want = np.asarray(model(ids[None, :], training=False))[0]
    return {"max_abs_logit_diff": float(np.max(np.abs(got - want)))}
