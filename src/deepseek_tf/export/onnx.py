"""ONNX export of the logits function (Keras `model.export(format="onnx")`, tf2onnx inside).

One graph: input `token_ids` `(batch, seq)` int32 (both dynamic), output
float32 logits `(batch, seq, vocab)`. No KV cache or generation loop: decode by
re-running the whole prefix (or use the SavedModel `generate` signature).
MLA converts; MoE models are refused (tf2onnx 1.17 writes an invalid `OneHot`
node for the expert dispatch that onnxruntime rejects).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from deepseek_tf.errors import DeepSeekTFError, InputError

OPSET = 17


def _require():
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as e:
        raise DeepSeekTFError(
            f"ONNX export needs tf2onnx and onnxruntime ({e.name} is missing): "
            "pip install tf2onnx==1.17.0 onnxruntime"
        ) from None


def export_onnx(model, out_path, *, verify: bool = True, seed: int = 0) -> dict:
    """Writes `out_path` (.onnx); verifies it with onnxruntime against the Keras model."""
    if any(getattr(model, "moe_layers", ())):
        raise InputError(
            "ONNX export does not support MoE layers (tf2onnx 1.17 emits an invalid OneHot node "
            "for the expert dispatch); use --format savedmodel or litert"
        )
    _require()
    spec = tf.TensorSpec([None, None], tf.int32, name="token_ids")
    model.export(str(out_path), format="onnx", input_signature=[spec], verbose=False)
    report = {
        "format": "onnx",
        "path": str(out_path),
        "signatures": ["logits"],
        "notes": "logits only (no KV cache); MoE models are refused",
    }
    if verify:
        report.update(verify_onnx(model, out_path, seed=seed))
    return report


def onnx_logits(path, token_ids) -> np.ndarray:
    """Runs the exported graph with onnxruntime: `(B, T)` ids -> `(B, T, V)` logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.asarray(token_ids, np.int32)})[0]


def verify_onnx(model, path, *, seed: int = 0) -> dict:
    """Max abs logit diff against the Keras model on random prompts of two shapes."""
    rng = np.random.default_rng(seed)
    diff = 0.0
    for batch, length in ((1, 5), (2, min(12, model.max_seq_len))):
        ids = rng.integers(0, model.vocab_size, (batch, length)).astype(np.int32)
        got = onnx_logits(path, ids)
        want = np.asarray(model(ids, training=False))
        diff = max(diff, float(np.max(np.abs(got - want))))
    return {"max_abs_logit_diff": diff}
