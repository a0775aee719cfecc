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
