"""Batch-1 decoding of the 1.46B demonstration checkpoint against PyTorch `transformers`.

The checkpoint is `real_checkpoint.py`'s (DeepSeek-V2-Lite's structure at hidden 1024
and 12 layers: 1.46B parameters, 2.8 GB of bf16 safetensors), converted once with
`deepseek-tf convert --from-hf` (which gives a bfloat16 checkpoint `model.dtype: auto`).
Then, each in its own process, one after the other: deepseek-tf loading it as `auto`
(float32 on a CPU without native bfloat16) and as `bfloat16`, and `transformers`
loading the same safetensors in bfloat16 and float32. Each process: load, one greedy
token (compiles), one untimed and one timed greedy decode of `--new-tokens` tokens
after the same short prompt, one 1-token call (the prompt's prefill and its token), and
a `--prefill`-token prompt for 1 new token (once untimed, once timed). Reported: seconds
from process start to the first token; decode tokens/s with the prompt's prefill and
per step without it ((n - 1) tokens over the n-token call minus the 1-token call); the
long prompt's prefill tokens/s; peak RSS (`getrusage` of the process); and the per-step
speed as a fraction of this machine's limit: read bandwidth
(`decode_kernels.read_bandwidth`) over the bytes of the weights one token multiplies
(attention, shared and 6 routed experts, the output head; not the embedding, which is
gathered).

    python benchmarks/decode_real.py --keep /tmp/rc    # ~15 min; reuses /tmp/rc/hf
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import bench_common as bc
from decode_kernels import read_bandwidth
from real_checkpoint import CLI, DECODE, MIB, make_checkpoint, measured

PEER = r"""
import json, sys, time
import psutil, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
hf, dtype, n = sys.argv[1], sys.argv[2], int(sys.argv[3])  # argv[4]: long prompt
torch.set_num_threads(psutil.cpu_count(logical=False) or 2)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=getattr(torch, dtype)).eval()
tokenizer = AutoTokenizer.from_pretrained(hf)
loaded = time.time() - psutil.Process().create_time()
ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(
    "Hello, how are you today?", add_special_tokens=False)])
def run(k):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
run(1)
first = time.time() - psutil.Process().create_time()
run(n)
t = time.perf_counter()
out = run(n)
seconds = time.perf_counter() - t
t = time.perf_counter()
run(1)  # the prompt's prefill and one token
one = time.perf_counter() - t
long = torch.tensor([[(7 * i) % (len(tokenizer) - 3) + 3 for i in range(int(sys.argv[4]))]])
with torch.inference_mode():
    model.generate(long, max_new_tokens=1, do_sample=False)  # as deepseek-tf: once untimed
    t = time.perf_counter()
    model.generate(long, max_new_tokens=1, do_sample=False)
    prefill = long.shape[1] / (time.perf_counter() - t)
new = out[0, ids.shape[1]:].tolist()
print(json.dumps({"loaded_s": loaded, "first_token_s": first, "decode_tok_s": n / seconds,
                  "step_tok_s": (n - 1) / max(seconds - one, 1e-9), "prefill_tok_s": prefill,
                  "dtype": dtype, "prompt": ids.shape[1], "tokens": new}))
"""


def active_parameters(hf_config: dict) -> int:
    """Weights one decoded token multiplies: every layer's attention (MLA without
    q-LoRA), its dense FFN or shared + `num_experts_per_tok` routed experts, and the
    output head (the embedding row is gathered, not multiplied)."""
    c = hf_config
    d, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q = d * heads * qk if not c.get("q_lora_rank") else (
        d * c["q_lora_rank"] + c["q_lora_rank"] * heads * qk)  # fmt: skip
    kv = d * (c["kv_lora_rank"] + c["qk_rope_head_dim"])
    kv += c["kv_lora_rank"] * heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
    attention = q + kv + heads * c["v_head_dim"] * d
    dense = 3 * d * c["intermediate_size"]
    moe = 3 * d * c["moe_intermediate_size"] * (c["n_shared_experts"] + c["num_experts_per_tok"])
    moe += d * c["n_routed_experts"]  # the router
    first = c.get("first_k_dense_replace", 0)
    return layers * attention + first * dense + (layers - first) * moe + d * c["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="checkpoint directory to reuse (hf/, run/) or create")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512, help="long prompt's length")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", default=bc.default_out("decode_real"))
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args()
    info = bc.machine_info(("tensorflow", "keras", "transformers", "torch"))
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-decode-"))
    hf, run = work / "hf", work / "auto_run"
    if not (hf / "config.json").is_file():
        print(f"[make] the checkpoint in {hf}", flush=True)
        make_checkpoint(hf, 12, 1024, 512)
    if not (run / "config.yaml").is_file():
        print("[convert] --from-hf", flush=True)
        assert measured([*CLI, "convert", "--from-hf", hf, "--out", run])["code"] == 0
    hf_config = json.loads((hf / "config.json").read_text())
    active = active_parameters(hf_config)
    bandwidth = read_bandwidth(info["cores"])
    sides = [("deepseek-tf", "auto"), ("deepseek-tf", "bfloat16")]
    if not args.skip_peer:
        sides += [("transformers", "bfloat16"), ("transformers", "float32")]
    rows = []
    for framework, dtype in sides:
        quiet = bc.maybe_wait_quiet(f"{framework} {dtype}", args.wait_quiet)
        if framework == "deepseek-tf":  # real_checkpoint's decode step, in `dtype`
            cmd = [sys.executable, "-c", DECODE, run, args.new_tokens, dtype, args.prefill]
        else:
            cmd = [sys.executable, "-c", PEER, hf, dtype, args.new_tokens, args.prefill]
        print(f"[decode] {framework} {dtype}", flush=True)
        done = measured(cmd)
        result = json.loads(done["out"].splitlines()[-1]) if done["code"] == 0 else {}
        weight_bytes = active * (4 if result.get("dtype") == "float32" else 2)
        limit = bandwidth / weight_bytes
        rows.append({"framework": framework, "asked": dtype, **result,
                     "peak_mib": done["peak_mib"], "limit_tok_s": limit, "quiet": quiet,
                     "of_limit": result.get("step_tok_s", 0) / limit})  # fmt: skip
    reference = rows[0].get("tokens")
    for row in rows:
        row["same_tokens_as_auto"] = row.get("tokens") == reference
    weights_mib = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / MIB
    bc.print_machine(info)
    print(f"active weights per token: {active / 1e6:,.0f}M; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; checkpoint {weights_mib:,.0f} MiB")  # fmt: skip

    def best(key):
        peers = [r.get(key, 0) for r in rows if r["framework"] != "deepseek-tf"]
        return max(peers, default=None)

    bc.print_table(
        ["side", "runs in", "first token", "decode tok/s", "vs best peer", "per step",
         "of limit", f"prefill {args.prefill}", "vs best peer", "peak RSS", "tokens = auto's"],
        [[f"{r['framework']} {r['asked']}", r.get("dtype", "-"),
          f"{bc.fmt(r.get('first_token_s'), '.1f')} s", bc.fmt(r.get("decode_tok_s"), ".2f"),
          bc.fmt(bc.ratio(r.get("decode_tok_s"), best("decode_tok_s")), ".2f"),
          bc.fmt(r.get("step_tok_s"), ".2f"), f"{r['of_limit']:.2f}",
          bc.fmt(r.get("prefill_tok_s"), ".1f"),
          bc.fmt(bc.ratio(r.get("prefill_tok_s"), best("prefill_tok_s")), ".2f"),
          f"{r['peak_mib']:,.0f} MiB", "yes" if r["same_tokens_as_auto"] else "no"]
         for r in rows],
    )  # fmt: skip
    result = {"machine": info, "active_parameters": active, "read_bandwidth": bandwidth,
              "weights_mib": weights_mib, "rows": rows}  # fmt: skip
    print(f"results -> {bc.write_json(args.out, result)}")


if __name__ == "__main__":
    main()
