"""DeepSeekMoE dispatch speed: sparse (tiled, dropless) vs dense-all-experts vs a dense SwiGLU.

One MoE layer with 64 routed experts, 6 active per token, no shared expert
(d_model 256, expert hidden 128), on N = 2048 tokens, every variant compiled
with XLA (`tf.function(jit_compile=True)`), float32:

- `sparse`: `DeepSeekMoE(dispatch="sparse")`, compute proportional to the 6 active experts;
- `dense_all`: `DeepSeekMoE(dispatch="dense")`, every expert on every token (the reference);
- `swiglu`: a dense `SwiGLU` of the same ACTIVE width (hidden = 6 x 128 = 768).

Timed: the forward pass, and a training step's forward + backward (the loss
`mean(y^2)` and its gradients w.r.t. the input and every trainable weight, no
optimiser).
Each timing is the median of `--repeats` calls; the variants are interleaved
round by round so that load from other processes hits them alike. Goals
(from the issue): sparse within 2x of the SwiGLU; dense_all about 10x.

Usage:
    python benchmarks/moe_dispatch.py                    # ~1-2 min on 2 cores
    python benchmarks/moe_dispatch.py --tiles 16 32 64   # also time fixed tile sizes
    python benchmarks/moe_dispatch.py --shared 1         # with one shared expert

Writes benchmarks/results/moe_dispatch.json (or `--out`).
"""

from __future__ import annotations

import argparse
import os
import time

import bench_common as bc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NAME = "moe_dispatch"
SPARSE_GOAL = 2.0  # sparse / swiglu
DENSE_EXPECTED = 10.0  # dense_all / swiglu, roughly


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--expert-hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--shared", type=int, default=0, help="shared experts (0: none)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiles", type=int, nargs="*", default=[], help="extra fixed tile sizes")
    p.add_argument(
        "--balance-steps",
        type=int,
        default=300,
        help="auxiliary-loss-free bias updates on the input before timing (the balanced load "
        "of a trained model; 0: the random router's load)",
    )
    p.add_argument(
        "--skip-dense", action="store_true", help="skip dense_all (slow at large shapes)"
    )
    p.add_argument("--out", default=bc.default_out(NAME))
    return p.parse_args(argv)


def build_variants(args):
    import keras
    import tensorflow as tf

    from deepseek_tf.layers.moe import DeepSeekMoE
    from deepseek_tf.layers.moe_tiles import auto_tile_size
    from deepseek_tf.layers.swiglu import SwiGLU

    keras.utils.set_random_seed(0)
    d, h, e, k = args.d_model, args.expert_hidden, args.experts, args.top_k
    x = tf.random.normal((args.tokens // 256 or 1, min(args.tokens, 256), d))  # (B, T, d)
    moe_kw = {
        "d_model": d,
        "moe_hidden_dim": h,
        "n_routed_experts": e,
        "n_shared_experts": args.shared,
        "num_experts_per_tok": k,
        "init_std": 0.1,
    }
    layers = {
        "sparse": DeepSeekMoE(**moe_kw, dispatch="sparse"),
        "dense_all": DeepSeekMoE(**moe_kw, dispatch="dense"),
        "swiglu": SwiGLU(d, (k + args.shared) * h),
    }
    if args.skip_dense:
        del layers["dense_all"]
    for tile in args.tiles:
        layers[f"sparse_tile{tile}"] = DeepSeekMoE(**moe_kw, dispatch="sparse", tile_size=tile)
    for layer in layers.values():
        layer(x)
    sparse = layers["sparse"]
    for _ in range(args.balance_steps):  # DeepSeek-V3's bias balancing, as training does
        sparse.gate.e_score_correction_bias.assign_add(
            0.01 * tf.sign(tf.reduce_mean(load := sparse(x)["expert_load"]) - load)
        )
    load = sparse(x)["expert_load"].numpy()
    balance = float(load.max() / load.mean())
    reference = layers["sparse"].get_weights()
    for name, layer in layers.items():
        if name.startswith("sparse_tile") or name == "dense_all":
            layer.set_weights(reference)

    def output(layer, x):
        out = layer(x)
        return out["x"] if isinstance(out, dict) else out

    fns = {}
    for name, layer in layers.items():

        def forward(x, layer=layer):
            return output(layer, x)

        def train_step(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_mean(tf.square(output(layer, x)))
            grads = tape.gradient(loss, [x, *layer.trainable_weights])
            # gathered weights' gradients arrive as IndexedSlices: densify, as an update would
            return loss, [tf.convert_to_tensor(g) for g in grads]

        fns[name] = {
            "forward": tf.function(forward, jit_compile=True),
            "train_step": tf.function(train_step, jit_compile=True),
        }
    info = {
        "auto_tile": auto_tile_size(args.tokens * k, e),
        "input_shape": list(x.shape),
        "balance_steps": args.balance_steps,
        "max_over_mean_load": balance,
    }
    return fns, x, layers, info


def run(args) -> dict:
    import numpy as np
    import tensorflow as tf

    machine = bc.machine_info(("tensorflow", "keras"))
    fns, x, layers, info = build_variants(args)
    parity = {}
    if "dense_all" in fns:
        ref = fns["dense_all"]["forward"](x).numpy()
        parity = {
            name: float(np.abs(f["forward"](x).numpy() - ref).max())
            for name, f in fns.items()
            if name.startswith("sparse")
        }

    def call(fn):
        out = fn(x)
        tf.nest.map_structure(lambda t: t.numpy(), out)  # waits for the result

    times = {name: {"forward": [], "train_step": []} for name in fns}
    for _ in range(args.warmup):
        for f in fns.values():
            for kind in ("forward", "train_step"):
                call(f[kind])
    for _ in range(args.repeats):
        for name, f in fns.items():
            for kind in ("forward", "train_step"):
                start = time.perf_counter()
                call(f[kind])
                times[name][kind].append(time.perf_counter() - start)
    ms = {
        name: {kind: 1e3 * bc.median(v) for kind, v in kinds.items()}
        for name, kinds in times.items()
    }
    ratios = {
        name: {kind: bc.ratio(ms[name][kind], ms["swiglu"][kind]) for kind in ms[name]}
        for name in ms
    }
    machine["load_average_at_end"] = bc.load_average()  # other processes share the cores
    return {
        "name": NAME,
        "machine": machine,
        "setup": {
            "tokens": args.tokens,
            "d_model": args.d_model,
            "expert_hidden": args.expert_hidden,
            "routed_experts": args.experts,
            "top_k": args.top_k,
            "shared_experts": args.shared,
            "swiglu_hidden": (args.top_k + args.shared) * args.expert_hidden,
            "dtype": "float32",
            "compiled": "tf.function(jit_compile=True)",
            "repeats": args.repeats,
            **info,
        },
        "ms_median": ms,
        "ratio_to_swiglu": ratios,
        "max_abs_diff_vs_dense_all": parity,
        "goals": {
            "sparse_over_swiglu_max": SPARSE_GOAL,
            "dense_all_over_swiglu_about": DENSE_EXPECTED,
            "sparse_met": all(r <= SPARSE_GOAL for r in ratios["sparse"].values()),
        },
    }


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    bc.print_machine(result["machine"])
    print(f"load average at end {result['machine']['load_average_at_end']}")
    s = result["setup"]
    print(
        f"MoE: {s['routed_experts']} experts, top-{s['top_k']}, {s['shared_experts']} shared, "
        f"d_model {s['d_model']}, expert hidden {s['expert_hidden']}, N {s['tokens']}, "
        f"auto tile {s['auto_tile']}; SwiGLU hidden {s['swiglu_hidden']}; max/mean expert "
        f"load {s['max_over_mean_load']:.2f} after {s['balance_steps']} bias updates"
    )
    rows = []
    for name, kinds in result["ms_median"].items():
        r = result["ratio_to_swiglu"][name]
        rows.append(
            [
                name,
                bc.fmt(kinds["forward"], ".1f"),
                bc.fmt(r["forward"], ".2f"),
                bc.fmt(kinds["train_step"], ".1f"),
                bc.fmt(r["train_step"], ".2f"),
            ]
        )
    bc.print_table(["variant", "fwd ms", "fwd / swiglu", "fwd+bwd ms", "fwd+bwd / swiglu"], rows)
    print("max |sparse - dense_all|:", result["max_abs_diff_vs_dense_all"])
    print(f"sparse within {SPARSE_GOAL}x of swiglu: {result['goals']['sparse_met']}")
    path = bc.write_json(args.out, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
