"""The small endpoints beside generation: routes, tokenize/detokenize, the chat page.

    GET  /metrics        -> Prometheus text format (no API key, like /health)
    POST /tokenize       -> `{"prompt": str}` or `{"messages": [...]}` (the chat template, as
        chat completions render it); optional `add_special_tokens`, `add_generation_prompt`,
        `return_token_strs` -> `{"tokens", "count", "max_model_len"[, "token_strs"]}` (vLLM's)
    POST /detokenize     -> `{"tokens": [ids]}` -> `{"prompt": text}`; an id out of range is
        a 400 naming it
    GET  / and /chat     -> the chat page (`static/index.html`), /static/NAME its files

Requests are counted in `ServerMetrics` by route template (`/v1/models/{name}:predict`, never
the raw path, so that the label set stays bounded); unknown paths count as "other".
"""

from __future__ import annotations

from importlib import resources

from deepseek_tf.serving.api_errors import ApiError, bad
from deepseek_tf.serving.messages import chat_messages
from deepseek_tf.serving.protocol import prompt_ids

ROUTES = {
    "/health": ("GET",),
    "/metrics": ("GET",),
    "/": ("GET",),
    "/chat": ("GET",),
    "/v1/models": ("GET",),
    "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",),
    "/tokenize": ("POST",),
    "/detokenize": ("POST",),
}
PUBLIC = ("/health", "/metrics", "/", "/chat", "/static/{file}")  # no API key needed
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page runs only its own files: no inline script, nothing from another origin.
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-cache"),
)


def endpoint(path: str) -> str:
    """The route template of `path` (a metrics label): a fixed set of values."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        if path.endswith(":predict"):
            return "/v1/models/{name}:predict"
        if path.count("/") == 3:
            return "/v1/models/{name}"
    if path.startswith("/static/") and path[len("/static/") :] in static_files():
        return "/static/{file}"
    return "other"


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods `path` answers (None: it is no route)."""
    template = endpoint(path)
    if template == "/v1/models/{name}:predict":
        return ("POST",)
    if template in ("/v1/models/{name}", "/static/{file}"):
        return ("GET",)
    return ROUTES.get(template)


_STATIC: dict[str, tuple[bytes, str]] | None = None


def static_files() -> dict[str, tuple[bytes, str]]:
    """`{name: (bytes, content type)}` of the chat page's files (read once)."""
    global _STATIC
    if _STATIC is None:
        files = {}
        for item in resources.files("deepseek_tf.serving").joinpath("static").iterdir():
            suffix = "." + item.name.rsplit(".", 1)[-1]
            if item.is_file() and suffix in CONTENT_TYPES:
                files[item.name] = (item.read_bytes(), CONTENT_TYPES[suffix])
        _STATIC = files
    return _STATIC


def static_file(path: str) -> tuple[bytes, str]:
    """The page (`/`, `/chat`) or one of its files (`/static/NAME`)."""
    name = "index.html" if path in ("/", "/chat") else path[len("/static/") :]
    return static_files()[name]


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be a boolean", key, "invalid_type")
    return value


def _check_body(app, body) -> None:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model", app.model_name)
    if model != app.model_name:
        raise ApiError(
            404,
            f"model {str(model)[:80]!r} does not exist; this server serves '{app.model_name}'",
            "invalid_request_error",
            "model_not_found",
            "model",
        )


def tokenize(app, body) -> dict:
    """`POST /tokenize`: the ids the completion or chat endpoint would see."""
    _check_body(app, body)
    if ("prompt" in body) == ("messages" in body):
        raise bad("give exactly one of 'prompt' or 'messages'", "prompt")
    if "messages" in body:
        messages = chat_messages(body["messages"])
        special = _flag(body, "add_special_tokens", False)
        generation = _flag(body, "add_generation_prompt", True)
        _, ids = prompt_ids(app.tokenizer, None, messages, special, generation)
    else:
        if not isinstance(body["prompt"], str):
            raise bad("'prompt' must be a string", "prompt", "invalid_type")
        special = _flag(body, "add_special_tokens", True)
        _, ids = prompt_ids(app.tokenizer, body["prompt"], special=special)
    out = {"tokens": ids, "count": len(ids), "max_model_len": app.limits.context}
    if _flag(body, "return_token_strs", False):
        out["token_strs"] = [app.tokenizer.decode([t]) for t in ids]
    return out


def detokenize(app, body) -> dict:
    """`POST /detokenize`: the text of token ids."""
    _check_body(app, body)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in ids
    ):
        raise bad("'tokens' must be a list of integer token ids", "tokens", "invalid_type")
    if app.tokenizer is None:
        raise bad("this model has no tokenizer: nothing to detokenize with", "tokens")
    size = app.tokenizer.vocab_size
    for t in ids:
        if not 0 <= t < size:
            raise bad(f"token id {str(t)[:40]} is out of range: ids lie in [0, {size})", "tokens")
    return {"prompt": app.tokenizer.decode(ids)}
