"""Reliability campaign: bad CLI inputs, malformed HTTP requests, kill -9 during training.

Three parts, each bounded in count and time, everything on this machine (the server binds
127.0.0.1):

1. **CLI**: `deepseek-tf` invocations with malformed configs, absurd sizes, bad files,
   devices, flags. Each must end with exit code 2 and exactly one `error: ...` line on
   stderr (no traceback). Run in-process through `cli.main.main` (a Python exception
   escaping it counts as a traceback), plus a few as real subprocesses.
2. **HTTP**: a real `deepseek-tf serve` subprocess on a tiny run, hit with malformed
   requests (request lines, methods, headers, Content-Length values, bodies: invalid
   JSON, huge integers, deep nesting, wrong types and ranges, early disconnects) mixed
   with valid ones. Counted: 5xx answers (must be 0), answers that are not JSON, and the
   server's health at the end.
3. **kill -9**: a training subprocess killed at random moments (`--kills` times), each
   time resumed with `--resume` (sometimes killed again during the resume); at the end
   the loss curve must equal an uninterrupted run's step for step, and each resume must
   start no more than one checkpoint interval before the last logged step.

    python benchmarks/reliability.py                       # ~15 min on 2 cores
    python benchmarks/reliability.py --requests 500 --kills 4
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
CLI = [sys.executable, "-m", "deepseek_tf.cli.main"]


# -- 1. CLI -------------------------------------------------------------------------------
def cli_cases(tmp: Path, run: Path) -> list[list[str]]:
    """Bad invocations; `{tmp}` and `{run}` are filled in."""
    files = {
        "binary.yaml": b"\x00\xff\xfe" * 10,
        "latin1.yaml": "model:\n  d_model: caf\xe9\n".encode("latin-1"),
        "deep.yaml": b"[" * 20000 + b"]" * 20000,
        "deep_map.yaml": b"a: " * 5000 + b"1",
        "dupes.yaml": b"preset: tiny\ntrain:\n  steps: 3\n  steps: 4\n",
        "list.yaml": b"- 1\n- 2\n",
        "bad_section.yaml": b"modle:\n  d_model: 3\n",
        "section_list.yaml": b"model: [1, 2]\n",
        "bigint.yaml": b"train:\n  steps: " + b"7" * 5000 + b"\n",
        "tabs.yaml": b"model:\n\td_model: 3\n",
        "empty.txt": b"",
        "latin1.txt": "caf\xe9 au lait".encode("latin-1"),
        "existing.txt": b"not a run",
    }
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    fifo = tmp / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    (tmp / "emptydir").mkdir(exist_ok=True)
    out = str(tmp / "out")
    train = ["train", "--preset", "tiny", "--out", out, "--sample-tokens", "0"]
    cases = [["train", "--config", str(tmp / f), "--out", out] for f in files if "yaml" in f]
    cases += [["train", "--config", str(tmp / "missing.yaml"), "--out", out]]
    cases += [["train", "--config", str(tmp / "emptydir"), "--out", out]]
    sets = [
        "train.steps=" + "9" * 5000, "train.steps=-1", "train.steps=0", "train.steps=abc",
        "train.steps=1.5", "train.batch_size=0", "train.batch_size=1000000000",
        "train.learning_rate=-1", "train.learning_rate=nan", "train.learning_rate=inf",
        "train.precision=fp8", "train.clip_norm=-1", "train.eval_every=-5",
        "train.gradient_accumulation_steps=0", "train.keep_checkpoints=0",
        "model.d_model=1000000000", "model.d_model=0", "model.d_model=-3", "model.d_model=1e9",
        "model.n_layers=100000", "model.n_layers=0", "model.n_heads=0", "model.n_heads=5",
        "model.n_kv_heads=3", "model.vocab_size=2000000000", "model.vocab_size=1",
        "model.vocab_size=-1", "model.max_seq_len=2000000000", "model.max_seq_len=0",
        "model.blocks=[]", "model.blocks=[mamba]", "model.position=sideways",
        "model.dropout=1.5", "model.attention=gqa", "model.kv_lora_rank=8",
        "model.n_routed_experts=-1", "model.num_experts_per_tok=3", "model.mtp_depth=-1",
        "compression.quantize=int3", "compression.lowrank=[x]", "compression.layer_n_heads=[1]",
        "model.rope_scaling_factor=0.5", "model.share_adjacent=all",
        "data.seq_len=0", "data.seq_len=100000", "data.val_fraction=1.5",
        "data.files=[/dev/zero]", f"data.files=[{fifo}]", f"data.files=[{tmp}/none*.txt]",
        f"data.files=[{tmp}/empty.txt]", f"data.files=[{tmp}/latin1.txt]",
        f"data.files=[{tmp}/emptydir]", "data.tokenizer=wordpiece", "data.vocab_size=10",
        "runtime.strategy=tpu", "runtime.strategy=magic", "runtime.devices=[banana]",
        "runtime.devices=[/gpu:7]", "runtime.intra_op_threads=-1", "nosection.key=1",
        "model.n_layrs=3", "model=3", "model.",
    ]  # fmt: skip
    cases += [[*train, "--set", s] for s in sets]
    cases += [
        [*train[:-2], "--out", str(tmp / "existing.txt")],
        ["train", "--out", str(tmp / "emptydir"), "--resume"],
        ["train", "--resume"],
        ["train", "--preset", "nope", "--out", out],
        ["train", "--out", str(run), "--resume", "--preset", "tiny"],
        [*train, "--batch-size", "zero"],
        ["eval", str(run), "--batch-size", "0"],
        ["eval", str(run), "--max-batches", "-1"],
        ["eval", str(tmp / "emptydir")],
        ["eval", str(tmp / "existing.txt")],
        ["eval", str(run), "--data", str(tmp / "latin1.txt")],
        ["eval", str(run), "--data", "/dev/zero"],
        ["info", str(tmp / "emptydir")],
        ["info", "--preset", "nope"],
        ["export", str(tmp / "emptydir"), "--format", "savedmodel", "--out", out],
    ]
    gen = ["generate", str(run), "--prompt", "A"]
    for flag, value in [
        ("--top-p", "-0.5"), ("--top-p", "2"), ("--temperature", "-1"),
        ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "3"),
        ("--top-k", "-3"), ("--max-new-tokens", "1000000000"), ("--max-new-tokens", "-1"),
    ]:  # fmt: skip
        cases.append([*gen, flag, value])
    cases += [
        ["generate", str(run), "--prompt", "x" * 500],
        ["generate", str(run), "--prompt", "\u20ac"],
        ["generate", str(run), "--prompt", "A", "--stop", "ab"],
        ["generate", str(tmp / "emptydir"), "--prompt", "A"],
    ]
    serve = ["serve", str(run)]
    for flag, value in [
        ("--port", "70000"), ("--port", "-1"), ("--chunk", "0"), ("--chunk", "-1"),
        ("--max-queue", "-1"), ("--max-body-bytes", "0"), ("--max-tokens", "0"),
        ("--max-batch", "0"), ("--batch-window-ms", "nan"), ("--max-connections", "0"),
        ("--host", "no-such-host.invalid"), ("--host", "256.1.1.1"),
    ]:  # fmt: skip
        cases.append([*serve, flag, value])
    return cases


def run_cli_case(args) -> dict:
    """One invocation in-process: exit code, stderr lines, whether a traceback escaped."""
    from deepseek_tf.cli.main import main

    err, out = io.StringIO(), io.StringIO()
    traceback = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SystemExit as e:  # argparse: usage + one error line
            code = e.code
        except BaseException as e:  # noqa: BLE001 - what the campaign counts
            code, traceback = None, f"{type(e).__name__}: {str(e)[:200]}"
    lines = [x for x in err.getvalue().splitlines() if x.strip() and not x.startswith("usage:")]
    lines = [x for x in lines if not x.startswith(" ")]  # argparse's usage continuation
    return {"args": args, "code": code, "lines": lines, "traceback": traceback}


def cli_campaign(tmp: Path, run: Path, subprocess_sample: int) -> dict:
    cases = cli_cases(tmp, run)
    results = []
    for args in cases:
        r = run_cli_case(args)
        ok = r["code"] == 2 and len(r["lines"]) == 1 and r["traceback"] is None
        ok = ok and (r["lines"][0].startswith("error: ") or ": error: " in r["lines"][0])
        results.append({**r, "ok": ok})
        if not ok:
            print(f"  CLI NOT OK: {args[:6]} -> {r}", flush=True)
        shutil.rmtree(tmp / "out", ignore_errors=True)
    sub = []
    for args in random.Random(0).sample(cases, min(subprocess_sample, len(cases))):
        if any("fifo" in a for a in args):
            continue
        done = subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=300)
        tb = "Traceback" in done.stderr
        sub.append({"args": args, "code": done.returncode, "traceback": tb})
        shutil.rmtree(tmp / "out", ignore_errors=True)
    return {
        "inputs": len(results),
        "one_line_errors": sum(r["ok"] for r in results),
        "tracebacks": sum(r["traceback"] is not None for r in results),
        "not_ok": [r for r in results if not r["ok"]],
        "subprocess_checked": len(sub),
        "subprocess_tracebacks": sum(s["traceback"] for s in sub),
        "subprocess_exit_codes": sorted({s["code"] for s in sub}),
    }


# -- 2. HTTP --------------------------------------------------------------------------------
def _bodies(rng: random.Random) -> bytes:
    choices = [
        b'{"prompt": "Th", "max_tokens": 4}',
        b'{"prompt": "Th", "max_tokens": 4, "temperature": 0.7, "top_k": 5, "seed": 3}',
        b"{not json",
        b"\xff\xfe\x00",
        b"[" * 100000,
        b'{"prompt": "Th", "seed": ' + b"9" * rng.randint(4000, 6000) + b"}",
        b'{"prompt": "Th", "temperature": 1' + b"0" * 400 + b"}",
        b'{"prompt": "Th", "temperature": 1e400}',
        b'{"prompt": "Th", "top_p": -1}',
        b'{"prompt": "Th", "top_k": "x"}',
        b'{"prompt": [1, 2, 99999999999999999999999]}',
        b'{"prompt": "Th", "max_tokens": 0}',
        b'{"prompt": "Th", "stop": [1]}',
        b'{"messages": [{"role": "user", "content": {"x": 1}}]}',
        b'{"messages": "hi"}',
        b'{"prompt": "' + b"Th" * 100 + b'"}',
        b'{"instances": [[1, 2], [3]]}',
        b'{"instances": [[' + b"7" * 5000 + b"]]}",
        b"null",
        b'"string"',
        b"",
    ]
    return rng.choice(choices)


def _request(rng: random.Random) -> tuple[bytes, bool]:
    """A raw HTTP request (mostly malformed) and whether the client leaves early."""
    path = rng.choice(
        ["/v1/completions", "/v1/chat/completions", "/v1/models/run:predict", "/health",
         "/v1/models", "/v1/models/run", "/nowhere", "/v1/models/x:predict", "/" + "a" * 70000]
    )  # fmt: skip
    method = rng.choice(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "BREW", ""])
    body = _bodies(rng)
    length = rng.choice(
        [str(len(body))] * 6 + ["\u00b2", "-1", "abc", "99999999999999999999", "0", str(10**7)]
    )
    version = rng.choice(["HTTP/1.1"] * 8 + ["HTTP/9.9", "HTTP/1.0", ""])
    headers = f"Host: x\r\nContent-Length: {length}\r\n"
    if rng.random() < 0.05:
        headers += "Transfer-Encoding: chunked\r\n"
    if rng.random() < 0.05:
        headers += "X-Junk: " + "\x1b[31m" * 3 + "\r\n"
    if rng.random() < 0.03:
        headers += "X-Big: " + "b" * 70000 + "\r\n"
    head = f"{method} {path} {version}\r\n{headers}\r\n".encode("utf-8", "replace")
    if rng.random() < 0.03:
        head = rng.randbytes(rng.randint(1, 200)) + b"\r\n\r\n"
    return head + body, rng.random() < 0.1


def _send(port: int, data: bytes, leave: bool) -> int | None:
    """Status code of the answer (None: the server closed without answering)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        if leave:  # a client that sends half and leaves (RST)
            sock.sendall(data[: max(1, len(data) // 2)])
            reset = struct.pack("ii", 1, 0)  # linger on, 0 s: close with RST
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
            return None
        with contextlib.suppress(OSError):
            sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    if not answer.startswith(b"HTTP/1."):
        return None
    status = int(answer.split(b" ", 2)[1])
    if status >= 400 and b'"error"' not in answer:
        raise AssertionError(f"a {status} without a JSON error: {answer[:300]!r}")
    return status


def _wait_ready(port: int, timeout: float = 300) -> None:
    """Polls /health until 200 (503 `{"status": "loading"}` while the server compiles)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"the server was not ready within {timeout:.0f} s")


def http_campaign(run: Path, requests: int, seconds: float) -> dict:
    # the server logs a line per request: into a file, never a pipe that could fill up
    with tempfile.TemporaryFile("w+") as log:
        return _http_campaign(run, requests, seconds, log)


def _http_campaign(run: Path, requests: int, seconds: float, log) -> dict:
    proc = subprocess.Popen(
        [*CLI, "serve", str(run), "--port", "0", "--max-tokens", "16"],
        env=ENV, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        _wait_ready(port)  # malformed requests against a server that has compiled
        rng = random.Random(1)
        counts, not_json, started = {}, 0, time.perf_counter()
        sent = 0
        while sent < requests and time.perf_counter() - started < seconds:
            data, leave = _request(rng)
            try:
                status = _send(port, data, leave)
            except AssertionError as e:
                not_json += 1
                print(f"  HTTP: {e}", flush=True)
                status = -1
            counts[status] = counts.get(status, 0) + 1
            sent += 1
        healthy = _send(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", False) == 200
        ok = _send(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 33\r\n"
                   b"\r\n" + b'{"prompt": "Th", "max_tokens": 4}', False) == 200  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        log.seek(0)
        stderr = log.read()
    return {
        "requests": sent,
        "seconds": round(time.perf_counter() - started, 1),
        "by_status": {str(k): v for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))},
        "server_errors_5xx": sum(v for k, v in counts.items() if k and k >= 500),
        "not_json_errors": not_json,
        "healthy_after": healthy and ok,
        "tracebacks_in_server_log": stderr.count("Traceback"),
    }


# -- 3. kill -9 -----------------------------------------------------------------------------
def _losses(run: Path) -> dict[int, float]:
    entries = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def _start_step(output: str) -> int | None:
    """The step a `train` invocation started from (its `[train] steps R->N` line)."""
    if "[train] steps " not in output:
        return None
    return int(output.split("[train] steps ", 1)[1].split("->", 1)[0])


def kill_campaign(tmp: Path, kills: int, steps: int, interval: int) -> dict:
    """Kills a training run `kills` times at random moments (start-up, restore, steps,
    checkpoint writes); each resume must lose at most one checkpoint interval, and the
    finished run's losses must equal an uninterrupted run's."""
    settings = ["--sample-tokens", "0", "--set", f"train.steps={steps}", "--set",
                f"train.checkpoint_every={interval}", "--set", "train.eval_every=0",
                "--set", "train.log_every=1"]  # fmt: skip
    reference = tmp / "reference"
    subprocess.run([*CLI, "train", "--preset", "tiny", *settings, "--out", str(reference)],
                   env=ENV, check=True, capture_output=True, timeout=900)  # fmt: skip
    expected = _losses(reference)
    run = tmp / "killed"
    rng = random.Random(2)
    events, restarts = [], 0
    previous_logged = None
    while len(events) < kills:
        fresh = not (run / "config.yaml").exists()
        args = [*CLI, "train", "--out", str(run), *settings]
        args += ["--preset", "tiny"] if fresh else ["--resume"]
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        delay = rng.uniform(2.0, 14.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        output = proc.communicate()[0]
        start = _start_step(output)
        if previous_logged is not None and start is not None:
            events[-1]["resumed_from"] = start
            events[-1]["lost_steps"] = previous_logged - start
        if proc.returncode == 0:  # finished before the kill: begin a new run
            shutil.rmtree(run)
            restarts += 1
            previous_logged = None
            continue
        previous_logged = max(_losses(run), default=0)
        events.append({"after_s": round(delay, 2), "last_logged_step": previous_logged,
                       "exit": proc.returncode})  # fmt: skip
    final = subprocess.run([*CLI, "train", "--out", str(run), "--resume", *settings],
                           env=ENV, capture_output=True, text=True, timeout=900)  # fmt: skip
    start = _start_step(final.stdout)
    if start is not None:
        events[-1]["resumed_from"] = start
        events[-1]["lost_steps"] = previous_logged - start
    losses = _losses(run)
    differing = [s for s in expected if abs(losses.get(s, -1.0) - expected[s]) > 1e-4]
    lost = [e["lost_steps"] for e in events if "lost_steps" in e]
    return {
        "kills": len(events),
        "runs_finished_before_a_kill": restarts,
        "steps": steps,
        "checkpoint_every": interval,
        "max_lost_steps": max(lost, default=0),
        "final_exit": final.returncode,
        "steps_logged": len(losses),
        "steps_differing_from_uninterrupted": len(differing),
        "events": events,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="HTTP requests (at most)")
    parser.add_argument("--http-seconds", type=float, default=420, help="HTTP time budget")
    parser.add_argument("--kills", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000, help="training steps per run")
    parser.add_argument("--interval", type=int, default=100, help="checkpoint interval")
    parser.add_argument("--subprocess-sample", type=int, default=12)
    parser.add_argument("--out", default=bc.default_out("reliability"))
    args = parser.parse_args()
    info = bc.machine_info(["tensorflow", "keras"])
    bc.print_machine(info)
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        from deepseek_tf.api import train
        from deepseek_tf.config.loader import load_config

        run = tmp / "run"
        train(load_config("tiny"), out=run, verbose=0, sample_tokens=0)
        print("[cli] bad inputs", flush=True)
        cli = cli_campaign(tmp, run, args.subprocess_sample)
        print(f"  {cli['one_line_errors']}/{cli['inputs']} one-line errors, "
              f"{cli['tracebacks']} tracebacks", flush=True)  # fmt: skip
        print("[http] malformed requests", flush=True)
        http = http_campaign(run, args.requests, args.http_seconds)
        print(f"  {http['requests']} requests: {http['by_status']}", flush=True)
        print(f"[kill] {args.kills} x kill -9", flush=True)
        kill = kill_campaign(tmp, args.kills, args.steps, interval=args.interval)
        print(f"  {kill['kills']} kills, at most {kill['max_lost_steps']} steps lost, "
              f"{kill['steps_differing_from_uninterrupted']} steps differ from the "
              "uninterrupted run", flush=True)  # fmt: skip
    result = {"machine": info, "cli": cli, "http": http, "kill": kill}
    bc.write_json(args.out, result)
    ok = (
        cli["tracebacks"] == 0 and not cli["not_ok"] and cli["subprocess_tracebacks"] == 0
        and http["server_errors_5xx"] == 0 and http["not_json_errors"] == 0
        and http["healthy_after"] and kill["steps_differing_from_uninterrupted"] == 0
        and kill["final_exit"] == 0 and kill["max_lost_steps"] <= kill["checkpoint_every"]
    )  # fmt: skip
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
