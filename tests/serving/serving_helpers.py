"""Helpers of the serving tests: start a server in a thread, plain HTTP requests."""

import http.client
import json
import threading
import time


def start_server(model, tokenizer, **kwargs):
    """Starts a server on a free port; returns `(server, app, base_url)`."""
    from deepseek_tf.serving.server import ServingApp, make_server

    kwargs.setdefault("warm_up", False)  # shapes compile on first use (tests start many)
    app = ServingApp(model, tokenizer, "tiny", **kwargs)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    wait_ready(app)
    return server, app, f"http://127.0.0.1:{server.server_port}"


def wait_ready(app, timeout=300):
    """Waits until the server has compiled its shapes (/health answers 200)."""
    deadline = time.monotonic() + timeout
    while not app.ready:
        assert time.monotonic() < deadline, "the server did not get ready"
        time.sleep(0.05)


def request(base_url, method, path, body=None, headers=None, raw=None):
    """Plain HTTP: returns `(status, parsed JSON or text)`."""
    port = int(base_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def forward_greedy(model, prompts, n: int, vocab: int | None = None) -> list[list[int]]:
    """The plain reference of greedy decoding: for every new token the whole prefix runs
    through `model` (no cache) and the argmax of its last position (over the first `vocab`
    ids) is appended. One graph (no XLA) serves every length: cheaper than compiling a
    `Generator` when a test only needs the expected tokens. Returns each prompt's `n` ids."""
    import numpy as np
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, None), tf.int32)], autograph=False)
    def last_logits(ids):
        return model(ids, training=False)[0, -1]  # (V,)

    out = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(n):
            logits = last_logits(tf.constant([ids], tf.int32)).numpy()[:vocab]
            ids.append(int(np.argmax(logits)))
        out.append(ids[len(prompt) :])
    return out
