"""`deepseek-tf serve` from the command line: flags, and a real subprocess server."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from deepseek_tf.api.deployment import serve
from deepseek_tf.cli.main import build_parser
from deepseek_tf.errors import InputError


def test_serve_flags():
    args = build_parser().parse_args(["serve", "run"])
    assert (args.host, args.port, args.no_batching) == ("127.0.0.1", 8000, False)
    assert args.warm_up is True and args.api == "deepseek_tf.api.deployment:serve"
    args = build_parser().parse_args(["serve", "run", "--port", "0", "--api-key", "k"])
    assert (args.port, args.api_key) == (0, "k")
    assert build_parser().parse_args(["serve", "run", "--no-warm-up"]).warm_up is False


def test_serve_refuses_a_bad_port_before_loading(tmp_path):
    with pytest.raises(InputError, match="--port: must be in 0-65535"):
        serve(tmp_path / "nowhere", port=70000)


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_serve_subprocess(serve_run):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, "-m", "deepseek_tf.cli.main", "serve", str(serve_run)]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--api-key", "k", "--no-batching"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny on http://127.0.0.1:"), line
        url = line.split(" on ")[1].strip()
        statuses = []  # /health: 503 "loading" while the shapes compile, then 200 "ok"
        deadline = time.monotonic() + 300
        while not statuses or statuses[-1] != (200, "ok"):
            assert time.monotonic() < deadline, statuses[-3:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=30) as resp:
                    statuses.append((resp.status, json.load(resp)["status"]))
            except urllib.error.HTTPError as e:
                statuses.append((e.code, json.load(e)["status"]))
            time.sleep(0.05)
        assert statuses[0] == (503, "loading") and set(statuses) == {(503, "loading"), (200, "ok")}
        assert proc.stdout.readline().startswith("KV cache: 1 slots x 48 positions (")
        assert "ready" in proc.stdout.readline()
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"prompt": "Th", "max_tokens": 3}).encode(),
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.load(resp)["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
