"""Model FLOPs utilisation: training FLOPs per token, and this machine's matmul peak.

`flops_per_token` is the PaLM appendix B count nanoGPT's `estimate_mfu` uses: 6 FLOPs
per non-embedding parameter per token (forward 2, backward 4) plus the attention
scores and values, 12 * layers * context * width. `matmul_peak` measures what a large
square matmul reaches here, in float32 and bfloat16, in a TensorFlow subprocess (the
benchmark driver stays free of TensorFlow): the peak MFU is quoted against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SHAPES_SCRIPT = r"""
import json, sys, time
import tensorflow as tf
shapes, seconds, out = json.loads(sys.argv[1]), float(sys.argv[2]), []
for m, k, n in shapes:
    for name in ("float32", "bfloat16"):
        a = tf.cast(tf.random.normal((m, k)), name)
        b = tf.cast(tf.random.normal((k, n)), name)
        for jit in (False, True):
            f = tf.function(lambda x, y: tf.matmul(x, y), jit_compile=jit)
            f(a, b).numpy()
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                f(a, b).numpy()
                calls += 1
            rate = 2 * m * k * n * calls / (time.perf_counter() - started)
            out.append({"shape": [m, k, n], "dtype": name, "xla": jit, "flops": rate})
print(json.dumps(out))
"""

PEAK_SCRIPT = r"""
import json, sys, time
import tensorflow as tf
n, seconds = int(sys.argv[1]), float(sys.argv[2])
out = {}
for name in ("float32", "bfloat16"):
    a = tf.random.normal((n, n), dtype=tf.float32)
    a, b = tf.cast(a, name), tf.cast(tf.transpose(a), name)
    for jit in (False, True):
        f = tf.function(lambda x, y: tf.matmul(x, y), jit_compile=jit)
        f(a, b).numpy()  # compile
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            f(a, b).numpy()
            calls += 1
        rate = 2 * n**3 * calls / (time.perf_counter() - started)
        out[name] = max(out.get(name, 0.0), rate)
print(json.dumps(out))
"""


def flops_per_token(non_embedding_params: int, layers: int, context: int, width: int) -> float:
    """Training FLOPs per token (forward and backward), nanoGPT's/PaLM's count."""
    return 6.0 * non_embedding_params + 12.0 * layers * context * width


def dense_flops_per_token(
    layers: int, width: int, ffn_params_per_layer: int, vocab: int, context: int
) -> float:
    """`flops_per_token` of a dense transformer: attention projections 4 * width^2 per
    layer, the feed-forward's weights, and the (tied) output head, vocab * width."""
    params = layers * (4 * width * width + ffn_params_per_layer) + vocab * width
    return flops_per_token(params, layers, context, width)


def model_flops(model: dict, vocab: int, context: int) -> float | None:
    """Training FLOPs per token of a deepseek-tf run's `model` config section (a dense
    multi-head-attention model; None for MoE, MLA or MTP, whose count differs)."""
    if model.get("n_routed_experts") or model.get("attention") != "mha" or model.get("mtp_depth"):
        return None
    d = model["d_model"]
    return dense_flops_per_token(model["n_layers"], d, 3 * d * model["ffn_dim"], vocab, context)


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> dict:
    """{"float32": FLOP/s, "bfloat16": FLOP/s}: the best of TensorFlow's matmul with and
    without XLA on an (n, n) x (n, n) product, each timed for `seconds`."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(n), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_shapes(shapes, seconds: float = 1.5) -> list[dict]:
    """FLOP/s of TensorFlow's matmul on each (m, k, n) in float32 and bfloat16, through
    oneDNN (no XLA) and through XLA, in a TensorFlow subprocess."""
    done = subprocess.run(
        [sys.executable, "-c", SHAPES_SCRIPT, json.dumps(shapes), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def mfu(tokens_per_sec: float, per_token: float, peak: float) -> float:
    return tokens_per_sec * per_token / peak


if __name__ == "__main__":
    # the speedrun's shapes: (batch x context, width) x (width, ffn) and back, and a square
    rows = matmul_shapes([[8192, 256, 704], [8192, 704, 256], [16384, 384, 1024], [2048] * 3])
    print(f"{'m x k x n':>20}  {'dtype':>8}  {'oneDNN':>8}  {'XLA':>8}  GFLOP/s")
    for i in range(0, len(rows), 2):
        tf_row, xla_row = rows[i], rows[i + 1]
        shape = " x ".join(map(str, tf_row["shape"]))
        print(
            f"{shape:>20}  {tf_row['dtype']:>8}  {tf_row['flops'] / 1e9:8.0f}  "
            f"{xla_row['flops'] / 1e9:8.0f}"
        )
