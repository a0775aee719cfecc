"""A DeepSeek checkpoint at real scale: convert, load, decode, fine-tune, quantize, chat.

`transformers` makes a random DeepSeek-V2-Lite-structured model (MLA without
q-LoRA, 64 routed + 2 shared experts, 6 active, softmax routing, first layer
dense; V2-Lite's head dims and vocabulary) scaled to about 1.4B parameters, saved
as sharded bf16 safetensors with a DeepSeek-style tokenizer and chat template.
Each step then runs as its own `deepseek-tf` process, its peak RSS read by its
parent (`getrusage`):

    convert --from-hf (bf16, tensor by tensor)   peak RSS vs 1.25 x weights + footprint
    convert --to-hf (streamed shards)            the same bound
    generate: cold start to the first token, then decode tokens/s
    train --init-from: 50 LoRA steps (attention), and 5 full fine-tuning steps
    int8 routed experts: size on disk, logit error against bf16
    serve: one chat request (the checkpoint's template; EOS ends it)

"footprint" is the same command's peak RSS on a tiny checkpoint of the same
structure (Python, TensorFlow, Keras and deepseek-tf themselves).

Usage:
    python benchmarks/real_checkpoint.py             # ~25 min on 2 cores, ~18 GB of RAM
    python benchmarks/real_checkpoint.py --layers 4  # a smaller model, to try it out
    python benchmarks/real_checkpoint.py --convert-only  # the two conversions (~4 GB, ~3 min);
                                                     # results/real_checkpoint_convert.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import bench_common as bc

NAME = "real_checkpoint"
ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "deepseek_tf.cli.main"]
MIB = 1024 * 1024


def hf_config(layers: int, hidden: int, moe_dim: int, vocab: int, q_lora: int | None = None):
    """DeepSeek-V2-Lite's structure (head dims, MLA ranks, experts) at a smaller width;
    `q_lora`: the queries' low rank (None: V2-Lite's full-rank queries)."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=5632,
        moe_intermediate_size=moe_dim,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        q_lora_rank=q_lora,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=4096,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
    )


def make_checkpoint(
    directory: Path, layers: int, hidden: int, moe_dim: int, q_lora: int | None = None
) -> dict:
    """Random bf16 model saved by transformers in 1 GB shards, plus the tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests" / "tokenizers"))
    from deepseek_style import write_deepseek_tokenizer

    write_deepseek_tokenizer(directory)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_config(
        hf_config(layers, hidden, moe_dim, 102400, q_lora), dtype=torch.bfloat16
    )
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size="1GB")
    del model
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return {"parameters": params, "bytes": weights, "seconds": time.perf_counter() - started}


def measured(cmd, timeout=3600, env=None) -> dict:
    """Runs `cmd` under a small wrapper process; returns its wall time, peak RSS (MiB),
    exit code and output."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, "
        "text=True, errors='replace')\n"
        "print(r.stdout); print(r.stderr[-4000:], file=sys.stderr)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(f'@@ {r.returncode} {time.perf_counter() - t:.3f} {peak}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *map(str, cmd)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )
    match = re.search(r"@@ (-?\d+) ([\d.]+) (\d+)", done.stdout)
    code, seconds, peak_kib = int(match[1]), float(match[2]), int(match[3])
    out = done.stdout[: match.start()].strip()
    if code != 0:
        print(f"[fail] {' '.join(map(str, cmd))}\n{done.stderr[-3000:]}", flush=True)
    return {"code": code, "seconds": seconds, "peak_mib": peak_kib / 1024, "out": out}


def tokens_per_sec(train_out: str) -> float | None:
    match = re.search(r"done: \d+ steps, (\d+) tokens/s", train_out)
    return float(match[1]) if match else None


QUANTIZE = """
import json, sys, time
import numpy as np
from deepseek_tf.api import load
from deepseek_tf.compress.quantization import quantize_model
from deepseek_tf.compress.run_io import directory_bytes, write_run
from deepseek_tf.config.loader import update_config
from deepseek_tf.rundir import RunDir
run, out = sys.argv[1], sys.argv[2]
config = RunDir(run).read_config()
model, tokenizer = load(run)
ids = np.asarray([tokenizer.encode("The weather in Zurich is sunny today, and")], np.int32)
want = np.asarray(model(ids), np.float32)
t = time.perf_counter()
quantize_model(model, config.model, "int8", include=("experts",), bits=8, group_size=-1)
seconds = time.perf_counter() - t
got = np.asarray(model(ids), np.float32)
cfg = update_config(config, compression={"quantize": "int8", "quantize_include": ["experts"]})
write_run(out, cfg, tokenizer, model, run, {"method": "quantize"})
print(json.dumps({"seconds": seconds, "bytes": directory_bytes(out),
                  "rel_err": float(np.abs(got - want).max() / np.abs(want).max()),
                  "argmax_agree": float(np.mean(got.argmax(-1) == want.argmax(-1)))}))
"""


DECODE = """
import json, sys, time
import psutil
from deepseek_tf.config.loader import update_config
from deepseek_tf.generation.generate import Generator
from deepseek_tf.models.builder import inference_dtype
from deepseek_tf.rundir import RunDir
run, n = RunDir(sys.argv[1]), int(sys.argv[2])
config = run.read_config()
if len(sys.argv) > 3:  # a model.dtype to load in (default: the run's own)
    config = update_config(config, model={"dtype": sys.argv[3]})
model, tokenizer = run.load(config)
loaded = time.time() - psutil.Process().create_time()
generator = Generator(model, vocab_limit=tokenizer.vocab_size)
prompt = tokenizer.encode_prompt("Hello, how are you today?")
generator.generate([prompt], 1, temperature=0)
first = time.time() - psutil.Process().create_time()
generator.generate([prompt], n, temperature=0)  # compiles this length
t = time.perf_counter()
tokens = generator.generate([prompt], n, temperature=0)[0]
seconds = time.perf_counter() - t
t = time.perf_counter()
generator.generate([prompt], 1, temperature=0)  # the prompt's prefill and one token
one = time.perf_counter() - t
result = {"loaded_s": loaded, "first_token_s": first, "decode_tok_s": n / seconds,
          "step_tok_s": (n - 1) / max(seconds - one, 1e-9),
          "dtype": inference_dtype(config), "prompt": len(prompt), "tokens": tokens}
if len(sys.argv) > 4:  # a long prompt's prefill: 1 new token after `argv[4]` tokens
    long = [(7 * i) % (tokenizer.vocab_size - 3) + 3 for i in range(int(sys.argv[4]))]
    generator.generate([long], 1, temperature=0)  # compiles its chunks
    t = time.perf_counter()
    generator.generate([long], 1, temperature=0)
    result["prefill_tok_s"] = len(long) / (time.perf_counter() - t)
print(json.dumps(result))
"""


def healthy(server: subprocess.Popen, url: str, started: float, limit: float = 900) -> bool:
    """Waits for `url`/health to answer; False if `server` exits or `limit` seconds after
    `started` pass first."""
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            return True
        except OSError:
            if server.poll() is not None or time.perf_counter() - started > limit:
                return False
            time.sleep(1)


def chat_once(run: Path, port: int) -> dict:
    """Starts `serve`, waits for /health, sends one chat request, stops the server."""
    started = time.perf_counter()
    server = subprocess.Popen(
        [*CLI, "serve", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not healthy(server, url, started):
            return {"error": "the server did not start"}
        ready = time.perf_counter() - started
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
        request = urllib.request.Request(
            url + "/v1/chat/completions",
            data=json.dumps({**body, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        t = time.perf_counter()
        reply = json.loads(urllib.request.urlopen(request, timeout=600).read())
        return {
            "server_ready_s": ready,
            "request_s": time.perf_counter() - t,
            "prompt_tokens": reply["usage"]["prompt_tokens"],
            "completion_tokens": reply["usage"]["completion_tokens"],
            "finish_reason": reply["choices"][0]["finish_reason"],
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def run_steps(hf: Path, work: Path, args) -> dict:
    run, back, lora, full, q = (work / n for n in ("run", "back", "lora", "full", "int8"))
    steps = {}
    print("[convert] --from-hf", flush=True)
    steps["from_hf"] = measured([*CLI, "convert", "--from-hf", hf, "--out", run])
    steps["run_bytes"] = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    print("[convert] --to-hf", flush=True)
    steps["to_hf"] = measured(
        [*CLI, "convert", "--to-hf", run, "--out", back, "--dtype", "bfloat16"]
    )
    if args.convert_only:
        return steps
    print("[generate] cold start and decode", flush=True)
    steps["generate"] = measured([sys.executable, "-c", DECODE, run, args.decode_tokens])
    fine_tune = [
        *CLI, "train", "--init-from", run, "--sample-tokens", "0",
        *("--set", "train.batch_size=1", "--set", f"data.seq_len={args.seq_len}"),
        *("--set", "train.eval_every=0", "--set", "train.eval_batches=1"),
        *("--set", "train.warmup_steps=2", "--set", "train.learning_rate=1e-4"),
    ]  # fmt: skip
    print(f"[train] LoRA, {args.lora_steps} steps", flush=True)
    steps["lora"] = measured(
        [*fine_tune, "--out", lora, "--set", f"train.steps={args.lora_steps}",
         "--set", "train.lora_rank=8", "--set", "train.lora_targets=[attention]"]
    )  # fmt: skip
    print(f"[train] full fine-tuning, {args.full_steps} steps", flush=True)
    steps["full"] = measured([*fine_tune, "--out", full, "--set", f"train.steps={args.full_steps}"])
    print("[quantize] int8 routed experts", flush=True)
    steps["int8"] = measured([sys.executable, "-c", QUANTIZE, run, q])
    print("[serve] one chat request", flush=True)
    steps["chat"] = chat_once(run, args.port)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-dim", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lora-steps", type=int, default=50)
    parser.add_argument("--full-steps", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--keep", help="keep the checkpoints and runs in this directory")
    parser.add_argument("--convert-only", action="store_true", help="only the two conversions")
    parser.add_argument(
        "--out", help=f"default {bc.default_out(NAME)} (_convert with --convert-only)"
    )
    args = parser.parse_args()
    args.out = args.out or bc.default_out(NAME + ("_convert" if args.convert_only else ""))
    info = bc.machine_info(("tensorflow", "keras", "transformers", "torch"))
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"[make] tiny and {args.layers}-layer checkpoints in {work}", flush=True)
        tiny = make_checkpoint(work / "tiny_hf", 2, 64, 32)
        made = make_checkpoint(work / "hf", args.layers, args.hidden, args.moe_dim)
        print(
            f"[make] {made['parameters']:,} parameters, {made['bytes'] / MIB:,.0f} MiB", flush=True
        )
        tiny_run, tiny_back = work / "tiny_run", work / "tiny_back"
        footprint = {
            "from_hf": measured(
                [*CLI, "convert", "--from-hf", work / "tiny_hf", "--out", tiny_run]
            ),
            "to_hf": measured(
                [*CLI, "convert", "--to-hf", tiny_run, "--out", tiny_back, "--dtype", "bfloat16"]
            ),
        }
        steps = run_steps(work / "hf", work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(info, args, tiny, made, footprint, steps)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(info, args, tiny, made, footprint, steps) -> None:
    weights_mib = made["bytes"] / MIB
    rows = []
    for key in ("from_hf", "to_hf"):
        bound = 1.25 * weights_mib + footprint[key]["peak_mib"]
        peak = steps[key]["peak_mib"]
        verdict = f"<= {bound:,.0f} MiB: {'yes' if peak <= bound else 'NO'}"
        label = f"convert --{key.replace('_', '-')}"
        rows.append([label, f"{steps[key]['seconds']:.1f} s", f"{peak:,.0f} MiB", verdict])
    if not args.convert_only:
        rows += usage_rows(args, steps)
    bc.print_machine(info)
    print(
        f"model: {made['parameters']:,} parameters, {weights_mib:,.0f} MiB of bf16 "
        f"safetensors; converted run {steps['run_bytes'] / MIB:,.0f} MiB"
    )
    bc.print_table(["step", "time / speed", "peak RSS", "notes"], rows)
    for step in steps.values():
        if isinstance(step, dict) and step.get("code", 0) == 0:
            step.pop("out", None)
    quant = steps.pop("quantize", {})
    result = {
        "machine": info,
        "args": vars(args),
        "model": made,
        "tiny": tiny,
        "footprint": footprint,
        "steps": steps,
        "quantize": quant,
    }
    print(f"results -> {bc.write_json(args.out, result)}")


def usage_rows(args, steps) -> list:
    """The rows after the conversions: decode, fine-tuning, int8, serve."""
    rows = []
    gen = (
        json.loads(steps["generate"]["out"].splitlines()[-1])
        if steps["generate"]["code"] == 0
        else {}
    )
    steps["decode"] = gen
    rss = f"{steps['generate']['peak_mib']:,.0f} MiB"
    first = f"{_fmt(gen.get('first_token_s'), '.1f')} s"
    rows.append(
        [
            "cold start to the 1st token",
            first,
            rss,
            f"weights loaded at {_fmt(gen.get('loaded_s'), '.1f')} s",
        ]
    )
    rows.append(
        [
            f"decode ({args.decode_tokens} tokens, greedy)",
            f"{_fmt(gen.get('decode_tok_s'), '.2f')} tok/s",
            rss,
            "KV-cached, XLA",
        ]
    )
    labels = {
        "lora": f"LoRA r=8 attention, {args.lora_steps} steps",
        "full": f"full fine-tuning, {args.full_steps} steps",
    }
    for key, label in labels.items():
        speed = f"{_fmt(tokens_per_sec(steps[key]['out']), ',.0f')} tok/s"
        wall = f"{steps[key]['seconds']:.0f} s wall"
        rows.append([label, speed, f"{steps[key]['peak_mib']:,.0f} MiB", wall])
    quant = {}
    if steps["int8"]["code"] == 0:
        quant = json.loads(steps["int8"]["out"].splitlines()[-1])
    size = f"{_fmt(quant.get('bytes', 0) / MIB, ',.0f')} MiB on disk"
    error = f"logit err {_fmt(quant.get('rel_err'), '.4f')}"
    error += f", argmax {_fmt(quant.get('argmax_agree'), '.2%')}"
    rows.append(["int8 routed experts", size, f"{steps['int8']['peak_mib']:,.0f} MiB", error])
    chat = steps["chat"]
    note = f"ready after {_fmt(chat.get('server_ready_s'), '.0f')} s, "
    note += f"{chat.get('completion_tokens')} tokens, {chat.get('finish_reason')}"
    rows.append(["serve: one chat request", f"{_fmt(chat.get('request_s'), '.1f')} s", "-", note])
    steps["quantize"] = quant
    return rows


if __name__ == "__main__":
    main()
