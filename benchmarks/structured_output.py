"""Structured output's cost: tokens/s of JSON-Schema-constrained replies against free text.

The continuous scheduler (`serving.scheduler`, in process, no HTTP) decodes `--requests`
requests, `--concurrency` at a time, with the shakespeare-char model shape (random
weights) and a byte-level BPE tokenizer trained here on the bundled corpus (512 tokens):
as free text, and under `response_format: json_schema` with a closed schema of enums,
booleans, small integers, a short array and a nested object, twice: as the server runs
it (the schema's token automaton followed inside the compiled decode loop,
`serving.token_automaton`) and with llguidance's host masks, one token per decode call
(`serving.grammar`: how JSON mode and open schemas run). Greedy; each request asks for
`--max-new-tokens`. Each mode runs `--repeats` times, interleaved; reported: generated
tokens/s (median), the median over repeats of each constrained run's ratio to the free-text
run before it (issue 25's goal: >= 0.8x) and llguidance's mask time per token. This
compares modes of deepseek-tf, not a peer.

Usage:
    python benchmarks/structured_output.py           # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import time

import bench_common as bc

NAME = "structured_output"
SCHEMA = {
    "type": "object",
    "properties": {
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "ok": {"type": "boolean"},
        "days": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 1,
            "maxItems": 3,
        },  # fmt: skip
        "where": {
            "type": "object",
            "properties": {
                "zone": {"enum": ["north", "south"]},
                "n": {"type": "integer", "minimum": 0, "maximum": 99},
            },  # fmt: skip
            "required": ["zone", "n"],
            "additionalProperties": False,
        },
    },
    "required": ["unit", "ok", "days", "where"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each mode")
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.serving.grammar import GrammarConstraint, GrammarVocab
    from deepseek_tf.serving.protocol import GenRequest
    from deepseek_tf.serving.scheduler import ContinuousScheduler
    from deepseek_tf.serving.structured import ReplyGrammar, compile_reply_grammar
    from deepseek_tf.tokenizers import BPETokenizer

    text = bc.corpus_path().read_text(encoding="utf-8")
    tokenizer = BPETokenizer.train([text + ' {"unit": "celsius", "ok": true} ' * 50], 512)
    cfg = load_config("shakespeare-char", overrides=["model.max_seq_len=128"])
    model = build_model(cfg, vocab_size=tokenizer.vocab_size, seed=0)
    grammar = compile_reply_grammar(SCHEMA, tokenizer, "response_format")
    prompts = [tokenizer.encode(line)[:24] for line in text.splitlines()[: args.requests * 3]
               if len(line) > 20][: args.requests]  # fmt: skip
    host = ReplyGrammar(grammar.vocab, grammar.text, None)  # llguidance, on the host
    modes = {"free text": None, "json_schema, in the loop": grammar,
             "json_schema, host masks": host}  # fmt: skip
    assert grammar.automaton is not None, "the benchmark's schema should be closed"

    def requests(rule):
        return [GenRequest("completion", "m", None, p, max_tokens=args.max_new_tokens,
                           temperature=0.0, grammar=rule) for p in prompts]  # fmt: skip

    scheduler = ContinuousScheduler(model, tokenizer, max_batch=args.concurrency).start()
    scheduler.ready.wait()
    for rule in modes.values():  # compiles each mode's programs
        bc.drive_scheduler(scheduler, requests(rule)[: args.concurrency], args.concurrency)
    meter = bc.maybe_wait_quiet(NAME, args.wait_quiet)
    runs = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, rule in modes.items():
            runs[name].append(bc.drive_scheduler(scheduler, requests(rule), args.concurrency))
    scheduler.stop()
    constraint = GrammarConstraint(GrammarVocab.for_tokenizer(tokenizer), grammar.text)
    began, steps = time.perf_counter(), 0
    for token in tokenizer.encode('{"unit":"celsius","ok":true,"days":[1],"where":{"zone"'):
        constraint.allowed()
        constraint.advance(token)
        steps += 1
    mask_us = (time.perf_counter() - began) / steps * 1e6
    rates = {name: bc.median([r["tokens_per_s"] for r in rs]) for name, rs in runs.items()}
    # each repeat's ratio to the free-text run just before it, then their median: this
    # machine's speed drifts by tens of percent between runs a minute apart
    ratios = {name: bc.median([bc.ratio(r["tokens_per_s"], f["tokens_per_s"])
                               for r, f in zip(runs[name], runs["free text"])])
              for name in modes}  # fmt: skip
    result = {"benchmark": NAME, "machine": bc.machine_info(["tensorflow", "keras", "llguidance",
              "outlines-core"]), "settings": vars(args), "quiet": meter, "runs": runs,
              "tokens_per_s": rates, "ratio": ratios, "mask_us_per_step": mask_us,
              "automaton_states": grammar.automaton.states}  # fmt: skip
    bc.print_machine(result["machine"])
    bc.print_table(["reply", "tokens", "tok/s (median)", "tok/s (runs)", "/ free (median)"], [
        [name, str(runs[name][0]["tokens"]), bc.fmt(rates[name], ".0f"),
         " ".join(bc.fmt(r["tokens_per_s"], ".0f") for r in runs[name]),
         bc.fmt(ratios[name], ".2f")] for name in modes])  # fmt: skip
    print(
        f"json_schema in the loop / free text: {bc.fmt(ratios['json_schema, in the loop'], '.2f')}x"
        f" (goal >= 0.8x; automaton of {grammar.automaton.states} states); llguidance mask +"
        f" advance {mask_us:.0f} us per token (vocabulary {tokenizer.vocab_size})"
    )
    print(f"result -> {bc.write_json(args.out, result)}")


if __name__ == "__main__":
    main()
