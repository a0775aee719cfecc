"""Helpers of the serving tests: start a server in a thread, plain HTTP requests."""

import http.client
import json
import threading


def start_server(model, tokenizer, **kwargs):
    """Starts a server on a free port; returns `(server, app, base_url)`."""
    from deepseek_tf.serving.server import ServingApp, make_server

    app = ServingApp(model, tokenizer, "tiny", **kwargs)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, app, f"http://127.0.0.1:{server.server_port}"


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
