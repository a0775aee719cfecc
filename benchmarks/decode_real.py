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

With `--llama-cpp TREE` (a llama.cpp source tree built as benchmarks/README.md says: `build/bin`
holds `llama-bench` and `llama-quantize`), llama.cpp runs the same checkpoint too: its
own `convert_hf_to_gguf.py` writes a bf16 GGUF (the tokenizer's pre-tokenizer, unknown
to it, is named `deepseek-v3`), `llama-quantize` a Q8_0 one, and `llama-bench` measures
each (`-r 3`): per step (`-n`), the prompt with its tokens (`-pg`) and the long prompt
(`-p`). llama.cpp needs q-LoRA for a DeepSeek-2 model of this depth, hence `--q-lora`.

deepseek-tf's processes run with XLA's persistent cache in a fresh directory, as the
command line runs them (`deepseek_tf.xla_cache`): the `auto` side fills it (a first run on
a machine: its first token waits for the batch-1 step's compilation), the `bfloat16` side
(the same model here) reads it (every later run).

With `--int8`, deepseek-tf also decodes the checkpoint converted with `convert --from-hf
--quantize int8` (every projection as weight-only int8 codes).

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

from deepseek_tf.xla_cache import enable as enable_xla_cache

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


CONVERT = r"""
import runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
from conversion import base
# the test tokenizer's BPE pre-tokenizer is unknown to llama.cpp: name DeepSeek-V3's
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(tree + "/convert_hf_to_gguf.py", run_name="__main__")
"""


SAME = {True: "yes", False: "no"}  # the tokens-as-auto's column (llama.cpp's: -)


def gguf_files(tree: Path, hf: Path, work: Path) -> dict:
    """llama.cpp's bf16 and Q8_0 GGUF files of `hf` (made once, kept in `work`)."""
    files = {"bf16": work / "model-bf16.gguf", "q8_0": work / "model-q8_0.gguf"}
    if not files["bf16"].is_file():
        print("[llama.cpp] convert_hf_to_gguf.py --outtype bf16", flush=True)
        cmd = [sys.executable, "-c", CONVERT, tree, hf, "--outtype", "bf16", "--outfile"]
        assert measured([*cmd, files["bf16"]])["code"] == 0
    if not files["q8_0"].is_file():
        print("[llama.cpp] llama-quantize Q8_0", flush=True)
        quantize = tree / "build" / "bin" / "llama-quantize"
        assert measured([quantize, files["bf16"], files["q8_0"], "Q8_0"])["code"] == 0
    return files


def llama_bench(tree: Path, gguf: Path, prompt: int, new: int, prefill: int, cores: int):
    """llama-bench of `gguf` as the other sides are measured: tokens/s of `new` tokens
    after a `prompt`-token prompt, per step, and of a `prefill`-token prompt."""
    bench = tree / "build" / "bin" / "llama-bench"
    cmd = [bench, "-m", gguf, "-t", cores, "-r", 3, "-o", "json",
           "-p", prefill, "-n", new, "-pg", f"{prompt},{new}"]  # fmt: skip
    done = measured(cmd)
    if done["code"] != 0:
        return done, {}
    runs = json.loads(done["out"])
    by = {(r["n_prompt"], r["n_gen"]): r["avg_ts"] for r in runs}
    return done, {
        "decode_tok_s": new / ((prompt + new) / by[(prompt, new)]),  # -pg: all tokens/s
        "step_tok_s": by[(0, new)],
        "prefill_tok_s": by[(prefill, 0)],
        "dtype": gguf.stem.split("-")[-1],
        "prompt": prompt,
    }


def framework_footprint(work: Path, args) -> float:
    """Peak RSS (MiB) of deepseek-tf's side on a 2-layer, width-64 checkpoint of the same
    structure: Python, TensorFlow, Keras and deepseek-tf themselves (`real_checkpoint`'s
    "footprint")."""
    tiny_hf, tiny_run = work / "tiny_hf", work / "tiny_run"
    if not (tiny_run / "config.yaml").is_file():
        make_checkpoint(tiny_hf, 2, 64, 32, args.q_lora or None)
        assert measured([*CLI, "convert", "--from-hf", tiny_hf, "--out", tiny_run])["code"] == 0
    cmd = [sys.executable, "-c", DECODE, tiny_run, args.new_tokens, "auto", args.prefill]
    return measured(cmd)["peak_mib"]


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
    parser.add_argument(
        "--q-lora",
        type=int,
        default=384,
        help="the queries' low rank of a new checkpoint (0: full rank)",
    )
    parser.add_argument("--llama-cpp", type=Path, help="a built llama.cpp source tree")
    parser.add_argument(
        "--int8", action="store_true", help="also a `convert --quantize int8` run of it"
    )
    parser.add_argument("--out", default=bc.default_out("decode_real"))
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args()
    info = bc.machine_info(("tensorflow", "keras", "transformers", "torch"))
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-decode-"))
    hf, run = work / "hf", work / "auto_run"
    if not (hf / "config.json").is_file():
        print(f"[make] the checkpoint in {hf}", flush=True)
        make_checkpoint(hf, 12, 1024, 512, args.q_lora or None)
    if not (run / "config.yaml").is_file():
        print("[convert] --from-hf", flush=True)
        assert measured([*CLI, "convert", "--from-hf", hf, "--out", run])["code"] == 0
    hf_config = json.loads((hf / "config.json").read_text())
    active = active_parameters(hf_config)
    bandwidth = read_bandwidth(info["cores"])
    # `auto` first, with XLA's persistent cache empty (it compiles, as a first `deepseek-tf
    # generate` on a machine does), then `bfloat16` with that cache (as every later one)
    xla_cache = {"DEEPSEEK_TF_XLA_CACHE": tempfile.mkdtemp(prefix="bench-xla-")}
    enable_xla_cache(xla_cache)  # the environment the command line gives TensorFlow
    sides = [("deepseek-tf", "auto"), ("deepseek-tf", "bfloat16")]
    if args.int8:  # every projection as int8 codes, quantized as the checkpoint is read
        int8_run = work / "int8_run"
        if not (int8_run / "config.yaml").is_file():
            print("[convert] --from-hf --quantize int8", flush=True)
            convert = [*CLI, "convert", "--from-hf", hf, "--out", int8_run, "--quantize", "int8"]
            assert measured(convert)["code"] == 0
        sides.append(("deepseek-tf", "int8"))
    if not args.skip_peer:
        sides += [("transformers", "bfloat16"), ("transformers", "float32")]
    if args.llama_cpp:
        ggufs = gguf_files(args.llama_cpp, hf, work)
        sides += [("llama.cpp", "bf16"), ("llama.cpp", "q8_0")]
    rows = []
    for framework, dtype in sides:
        quiet = bc.maybe_wait_quiet(f"{framework} {dtype}", args.wait_quiet)
        print(f"[decode] {framework} {dtype}", flush=True)
        if framework == "llama.cpp":
            prompt = rows[0].get("prompt", 14)  # deepseek-tf's prompt length
            done, result = llama_bench(args.llama_cpp, ggufs[dtype], prompt, args.new_tokens,
                                       args.prefill, info["cores"])  # fmt: skip
        else:
            if framework == "deepseek-tf" and dtype == "int8":  # in its own dtype
                cmd = [sys.executable, "-c", DECODE, int8_run, args.new_tokens, "auto",
                       args.prefill]  # fmt: skip
            elif framework == "deepseek-tf":  # real_checkpoint's decode step, in `dtype`
                cmd = [sys.executable, "-c", DECODE, run, args.new_tokens, dtype, args.prefill]
            else:
                cmd = [sys.executable, "-c", PEER, hf, dtype, args.new_tokens, args.prefill]
            done = measured(cmd, env=xla_cache if framework == "deepseek-tf" else None)
            result = json.loads(done["out"].splitlines()[-1]) if done["code"] == 0 else {}
        # int8: the codes (+ per-channel scales); Q8_0: 8.5 bits
        bytes_per = (
            1 if dtype == "int8" else {"float32": 4, "q8_0": 34 / 32}.get(result.get("dtype"), 2)
        )
        weight_bytes = active * bytes_per
        limit = bandwidth / weight_bytes
        rows.append({"framework": framework, "asked": dtype, **result,
                     "peak_mib": done["peak_mib"], "limit_tok_s": limit, "quiet": quiet,
                     "of_limit": result.get("step_tok_s", 0) / limit})  # fmt: skip
    footprint = framework_footprint(work, args)
    reference = rows[0].get("tokens")
    for row in rows:
        row["same_tokens_as_auto"] = row.get("tokens") == reference if "tokens" in row else None
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
          f"{r['peak_mib']:,.0f} MiB", SAME.get(r["same_tokens_as_auto"], "-")]
         for r in rows],
    )  # fmt: skip
    for row in rows[:2]:  # deepseek-tf's: peak RSS over the weights, the footprint aside
        row["rss_over_weights"] = (row["peak_mib"] - footprint) / weights_mib
        print(f"{row['framework']} {row['asked']}: peak RSS = footprint {footprint:,.0f} MiB + "
              f"{row['rss_over_weights']:.2f} x the weights (goal <= 1.3)")  # fmt: skip
    result = {"machine": info, "active_parameters": active, "read_bandwidth": bandwidth,
              "weights_mib": weights_mib, "footprint_mib": footprint, "rows": rows}  # fmt: skip
    print(f"results -> {bc.write_json(args.out, result)}")


if __name__ == "__main__":
    main()
