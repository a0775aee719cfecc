"""Checks of a written GGUF file: its tensors read back with the `gguf` package and,
where `llama-cpp-python` is installed, its logits computed by llama.cpp itself."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from deepseek_tf.export.gguf_tensors import gguf_name, hf_tensors


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def read_back_error(model, hf: dict, path) -> float:
    """Largest relative error (max |read - model| / max |model|) over the file's tensors."""
    import gguf  # the optional [export] extra

    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    worst = 0.0
    for hf_name, want in hf_tensors(model, hf):
        tensor = stored.pop(gguf_name(hf_name, hf))
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        scale = float(np.max(np.abs(want))) or 1.0
        worst = max(worst, float(np.max(np.abs(got - want))) / scale)
    if stored:
        raise AssertionError(f"GGUF file has tensors the model does not: {sorted(stored)}")
    return worst


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs to fd 2 from C; kept off the terminal while it loads."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_llama(path, n_ctx: int, n_threads: int | None = None):
    """A `llama_cpp.Llama` over `path` that keeps every position's logits (None when
    llama-cpp-python is not installed); `n_threads` None: llama-cpp-python's default."""
    llama_cpp = _llama_cpp()
    if llama_cpp is None:
        return None
    with _quiet_stderr():
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=True,
            verbose=False, seed=0,
        )  # fmt: skip


def llama_logits(llm, token_ids) -> np.ndarray:
    """llama.cpp's `(T, V)` logits of one sequence of token ids."""
    llm.reset()
    llm.eval(list(map(int, token_ids)))
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def llama_greedy(llm, token_ids, n: int) -> list[int]:
    """`n` greedy tokens after `token_ids`, decoded by llama.cpp (its KV cache)."""
    llm.reset()
    llm.eval(list(map(int, token_ids)))
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def verify_gguf(model, hf: dict, path, *, seed: int = 0, length: int = 12) -> dict:
    """`max_rel_weight_error` of the file's tensors; with llama-cpp-python, also
    `max_abs_logit_diff` and `argmax_agreement` of llama.cpp against Keras on a random
    sequence of `length` token ids."""
    report = {"max_rel_weight_error": read_back_error(model, hf, path)}
    length = min(length, model.max_seq_len)
    llm = open_llama(path, n_ctx=max(length, 16))
    if llm is None:
        report["llama_cpp"] = "not installed (pip install llama-cpp-python): logits not compared"
        return report
    ids = np.random.default_rng(seed).integers(0, model.vocab_size, length)
    got = llama_logits(llm, ids)
    want = np.asarray(model(ids[None].astype(np.int32), training=False))[0]
    report["max_abs_logit_diff"] = float(np.max(np.abs(got - want)))
    report["argmax_agreement"] = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    return report
