"""Short requests in a long-context server: what a decode call's cache span saves.

The continuous scheduler (`serving.scheduler`, in process, no HTTP) with the
shakespeare-char model shape (random weights) decodes `--requests` requests of 24 token
ids and `--max-new-tokens` greedy tokens, `--concurrency` at a time, in three servers:
a context of `--context` positions whose decode calls read only the span the rows reach
(`serving.slot_cache`, the default `min_span`), the same context read whole on every
call (`min_span` = the context: the behaviour before spans), and a context of 128 (the
cost of these requests when the cache holds nothing more). Reported: generated tokens/s
and their ratios. It compares settings of deepseek-tf, not a peer.

Usage:
    python benchmarks/serve_context.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os

import bench_common as bc

NAME = "serve_context"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from deepseek_tf.config.loader import load_config
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.serving.protocol import GenRequest
    from deepseek_tf.serving.scheduler import ContinuousScheduler
    from deepseek_tf.serving.slot_cache import MIN_SPAN

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 65, 24).tolist() for _ in range(args.requests)]
    requests = [GenRequest("completion", "m", None, p, max_tokens=args.max_new_tokens,
                           temperature=0.0) for p in prompts]  # fmt: skip
    servers = {  # name: (context, min_span)
        f"context {args.context}, spans": (args.context, MIN_SPAN),
        f"context {args.context}, whole cache": (args.context, args.context),
        "context 128": (128, MIN_SPAN),
    }
    meter = bc.maybe_wait_quiet(NAME, args.wait_quiet)
    results = {}
    for name, (context, min_span) in servers.items():
        cfg = load_config("shakespeare-char", overrides=[f"model.max_seq_len={context}"])
        model = build_model(cfg, vocab_size=65, seed=0)
        scheduler = ContinuousScheduler(model, None, max_batch=args.concurrency,
                                        min_span=min_span).start()  # fmt: skip
        scheduler.ready.wait()
        # a first round uses every shape
        bc.drive_scheduler(scheduler, requests[: args.concurrency], args.concurrency)
        results[name] = bc.drive_scheduler(scheduler, requests, args.concurrency)
        scheduler.stop()
    spans, whole, short = (r["tokens_per_s"] for r in results.values())
    result = {"benchmark": NAME, "machine": bc.machine_info(["tensorflow", "keras"]),
              "settings": vars(args), "quiet": meter, "servers": results,
              "spans_vs_whole": bc.ratio(spans, whole),
              "spans_vs_short_context": bc.ratio(spans, short)}  # fmt: skip
    bc.print_machine(result["machine"])
    bc.print_table(["server", "tokens", "wall s", "tok/s"], [
        [name, str(r["tokens"]), bc.fmt(r["wall_s"], ".1f"), bc.fmt(r["tokens_per_s"], ".0f")]
        for name, r in results.items()])  # fmt: skip
    print(
        f"spans / whole cache: {bc.fmt(result['spans_vs_whole'], '.2f')}x; "
        f"spans / a 128-position server: {bc.fmt(result['spans_vs_short_context'], '.2f')}x"
    )
    raise SystemExit(bc.finish(NAME, meter, args.out, result))


if __name__ == "__main__":
    main()
