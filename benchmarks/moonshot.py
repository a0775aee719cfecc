"""The moonshot: a DeepSeek-V2-Lite-sized checkpoint (15.7B parameters, 31 GB of bf16
safetensors) converted to int4 and used on one small machine.

The script writes a Hugging Face checkpoint with DeepSeek-V2-Lite's exact
`config.json` (27 layers, hidden 2048, MLA with a 512-rank latent, 64 routed + 2
shared experts of width 1408, 6 active, 102,400-token vocabulary, a 163,840-position
context) and random bf16 weights, shard by shard (one 2 GB shard in memory at a time;
the values are slices of one random pool, so writing costs what the disk does), with a
small DeepSeek-style tokenizer. Then each step runs as its own `deepseek-tf` process,
its peak RSS read by its parent (`real_checkpoint.measured`):

    convert --from-hf --quantize int4 --group-size 128   time, peak RSS, run size
    generate (DECODE of real_checkpoint.py)              load, first token, decode tok/s
    eval --data the corpus (one batch)                   time, loss, peak RSS
    serve with default flags, one chat request           ready, request time, peak RSS

Usage:
    python benchmarks/moonshot.py --work /tmp/moon          # ~31 GB + ~9 GB of disk
    python benchmarks/moonshot.py --work /tmp/moon --layers 2   # a dry run (~2 GB)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import bench_common as bc
import ml_dtypes
import numpy as np
import psutil
import real_checkpoint as rc

from deepseek_tf.convert.safetensors_writer import TensorSpec, stream_checkpoint

NAME = "moonshot"
ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# Hugging Face deepseek-ai/DeepSeek-V2-Lite config.json
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}


def tensor_shapes(hf: dict) -> dict:
    """Every tensor of a DeepSeek-V2 checkpoint of config `hf`: name -> torch shape."""
    d, v, heads = hf["hidden_size"], hf["vocab_size"], hf["num_attention_heads"]
    nope, rope, vdim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
    kv, e, moe = hf["kv_lora_rank"], hf["n_routed_experts"], hf["moe_intermediate_size"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            f"{p}input_layernorm.weight": (d,),
            f"{p}self_attn.q_proj.weight": (heads * (nope + rope), d),
            f"{p}self_attn.kv_a_proj_with_mqa.weight": (kv + rope, d),
            f"{p}self_attn.kv_a_layernorm.weight": (kv,),
            f"{p}self_attn.kv_b_proj.weight": (heads * (nope + vdim), kv),
            f"{p}self_attn.o_proj.weight": (d, heads * vdim),
            f"{p}post_attention_layernorm.weight": (d,),
        }
        widths = [(f"{p}mlp.", hf["intermediate_size"])]
        if i >= hf["first_k_dense_replace"]:
            shared = hf["n_shared_experts"] * moe
            widths = [(f"{p}mlp.experts.{j}.", moe) for j in range(e)]
            widths.append((f"{p}mlp.shared_experts.", shared))
            shapes[f"{p}mlp.gate.weight"] = (e, d)
        for prefix, width in widths:
            shapes[f"{prefix}gate_proj.weight"] = (width, d)
            shapes[f"{prefix}up_proj.weight"] = (width, d)
            shapes[f"{prefix}down_proj.weight"] = (d, width)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def write_checkpoint(directory: Path, hf: dict, seed: int = 0) -> dict:
    """Random bf16 weights (N(0, 0.02); norm scales 1) written shard by shard."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 24, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shapes = tensor_shapes(hf)
    specs = [TensorSpec(n, np.dtype(ml_dtypes.bfloat16), s) for n, s in shapes.items()]

    def chunks():
        for name, shape in shapes.items():
            size = int(np.prod(shape))
            if len(shape) == 1:
                yield {name: np.ones(shape, ml_dtypes.bfloat16)}
                continue
            start = int(rng.integers(0, pool.size))
            reps = -(-(start + size) // pool.size)
            flat = np.tile(pool, reps)[start : start + size] if reps > 1 else pool[start:][:size]
            yield {name: flat.reshape(shape)}

    started = time.perf_counter()
    stream_checkpoint(specs, chunks(), directory, 2 * 10**9)
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    sys.path.insert(0, str(ROOT / "tests" / "tokenizers"))
    from deepseek_style import write_deepseek_tokenizer

    write_deepseek_tokenizer(directory)
    params = sum(int(np.prod(s)) for s in shapes.values())
    written = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return {"parameters": params, "bytes": written, "seconds": time.perf_counter() - started}


def serve_once(run: Path, port: int) -> dict:
    """`real_checkpoint.chat_once` (default flags) with the server's peak RSS sampled."""
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.5):
            for proc in psutil.process_iter(["cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if "serve" in cmd and str(run) in cmd and "--port" in cmd:
                    with contextlib.suppress(psutil.Error):
                        peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = rc.chat_once(run, port)
    finally:
        stop.set()
        sampler.join()
    return {**result, "peak_mib": peak[0] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="directory for the checkpoint and run")
    parser.add_argument("--layers", type=int, default=27, help="V2-Lite's 27; fewer to try")
    parser.add_argument("--quantize", default="int4", choices=("int4", "int8"))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8473)
    parser.add_argument("--out", default=None, help=f"default {bc.default_out(NAME)}")
    args = parser.parse_args()
    info = bc.machine_info(("tensorflow", "keras"))
    work, hf = Path(args.work), {**V2_LITE, "num_hidden_layers": args.layers}
    source, run = work / "hf", work / f"run-{args.quantize}"
    made = json.loads((work / "made.json").read_text()) if (work / "made.json").exists() else None
    if made is None or made["layers"] != args.layers:
        print(f"[make] V2-Lite with {args.layers} layers in {source}", flush=True)
        made = {**write_checkpoint(source, hf), "layers": args.layers}
        (work / "made.json").write_text(json.dumps(made))
    print(f"[make] {made['parameters']:,} parameters, {made['bytes'] / GIB:.1f} GiB", flush=True)
    steps = {}
    shutil.rmtree(run, ignore_errors=True)
    print(f"[convert] --quantize {args.quantize}", flush=True)
    convert = [*rc.CLI, "convert", "--from-hf", source, "--out", run, "--quantize", args.quantize]
    steps["convert"] = rc.measured([*convert, "--group-size", args.group_size], timeout=7200)
    steps["run_bytes"] = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    print("[generate] cold start and decode", flush=True)
    decode = [sys.executable, "-c", rc.DECODE, run, args.decode_tokens]
    steps["generate"] = rc.measured(decode, timeout=7200)
    print("[eval] one batch of the corpus", flush=True)
    steps["eval"] = rc.measured(
        [*rc.CLI, "eval", run, "--data", bc.corpus_path(), "--batch-size", 1, "--max-batches", 1],
        timeout=7200,
    )
    print("[serve] default flags, one chat request", flush=True)
    steps["serve"] = serve_once(run, args.port)
    report(info, args, made, steps)


def report(info, args, made, steps) -> None:
    gen = {}
    if steps["generate"]["code"] == 0:
        gen = json.loads(steps["generate"]["out"].splitlines()[-1])
    conv, ev, serve = steps["convert"], steps["eval"], steps["serve"]
    bc.print_machine(info)
    print(
        f"model: {made['parameters']:,} parameters, {made['bytes'] / GIB:.1f} GiB of bf16 "
        f"safetensors; {args.quantize} run {steps['run_bytes'] / GIB:.2f} GiB"
    )
    rows = [
        [f"convert --quantize {args.quantize}", f"{conv['seconds']:.0f} s",
         f"{conv['peak_mib']:,.0f} MiB", f"exit {conv['code']}"],
        ["generate: weights loaded", f"{bc.fmt(gen.get('loaded_s'), '.1f')} s",
         f"{steps['generate']['peak_mib']:,.0f} MiB", f"exit {steps['generate']['code']}"],
        ["generate: first token", f"{bc.fmt(gen.get('first_token_s'), '.1f')} s", "", ""],
        [f"decode ({args.decode_tokens} tokens)", f"{bc.fmt(gen.get('decode_tok_s'), '.2f')} tok/s",
         "", f"per step {bc.fmt(gen.get('step_tok_s'), '.2f')}"],
        ["eval (1 x seq_len tokens)", f"{ev['seconds']:.0f} s", f"{ev['peak_mib']:,.0f} MiB",
         (ev["out"].splitlines() or ["-"])[-1][:60] if ev["code"] == 0 else f"exit {ev['code']}"],
        ["serve: ready / one chat", f"{bc.fmt(serve.get('server_ready_s'), '.0f')} s / "
         f"{bc.fmt(serve.get('request_s'), '.1f')} s", f"{serve.get('peak_mib', 0):,.0f} MiB",
         f"{serve.get('completion_tokens')} tokens, {serve.get('finish_reason')}"],
    ]  # fmt: skip
    bc.print_table(["step", "time / speed", "peak RSS", "notes"], rows)
    for step in steps.values():
        if isinstance(step, dict) and step.get("code", 0) == 0:
            step.pop("out", None)
    result = {"machine": info, "args": vars(args), "model": made, "steps": steps, "decode": gen}
    print(f"results -> {bc.write_json(args.out or bc.default_out(NAME), result)}")


if __name__ == "__main__":
    main()
