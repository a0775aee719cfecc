"""OpenAI-style request validation, the chat template, and JSON error shapes.

Every problem with a request raises `ApiError`, which the server answers as
`{"error": {"message", "type", "code"}}` with a 4xx status; nothing a client
sends can reach a 5xx.

Chats are rendered by the run's tokenizer: its `tokenizer_config.json` chat
template (a converted DeepSeek checkpoint's own), else the plain template of
`deepseek_tf.tokenizers.chat_template`. Completion prompts get the tokenizer's
BOS token where its settings add one (`add_bos_token`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deepseek_tf.generation.penalties import Penalties, check_penalties
from deepseek_tf.generation.sampler import SamplingError, check_logit_bias, check_sampling
from deepseek_tf.serving.api_errors import ApiError, bad
from deepseek_tf.serving.messages import chat_messages
from deepseek_tf.serving.structured import ReplyGrammar, compile_reply_grammar, reply_schema
from deepseek_tf.serving.tool_calls import ToolError, ToolSet, tool_set

MAX_STOP_STRINGS = 4
MAX_CHOICES = 8  # `n`: choices per request, each a row of the batch


@dataclass
class Limits:
    """Server-side bounds on requests (see `deepseek-tf serve --help`)."""

    context: int  # the model's max_seq_len
    max_prompt_tokens: int
    max_tokens: int  # largest max_tokens accepted
    max_body_bytes: int = 1 << 20
    max_instances: int = 64  # predict endpoint


@dataclass
class GenRequest:
    """A validated completion or chat request."""

    kind: str  # "completion" | "chat"
    model: str
    prompt: str | None  # text prompt (None when token ids were given)
    prompt_ids: list[int] = field(default_factory=list)
    n: int = 1  # choices, sampled independently (choice i with seed + i when seeded)
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # an extension (as vLLM's): keep the k most likely tokens; 0: all
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    logprobs: int | None = None  # None: off; k: chosen token plus up to k alternatives
    echo: bool = False
    include_usage: bool = False
    messages: list[dict] | None = None  # a chat's validated messages (rendered later)
    tools: ToolSet | None = None  # a chat's `tools` and `tool_choice`
    logit_bias: tuple = ()  # `(token, bias)` pairs (`sampler.check_logit_bias`)
    penalties: Penalties = field(default_factory=Penalties)  # presence, frequency, repetition
    raw_logit_bias: object = None  # as sent; checked against the vocabulary with the prompt
    schema: dict | None = None  # JSON Schema the reply is held to (`serving.structured`)
    schema_param: str = "response_format"  # the field the schema came from
    grammar: ReplyGrammar | None = None  # `schema` compiled for the tokenizer (`finalize_prompt`)
    adapter: int = 0  # the served LoRA adapter `model` names (0: the base model)


def _typed(body: dict, key: str, types, default, name: str):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise bad(f"'{key}' must be {name}, got a boolean", key, "invalid_type")
    if not isinstance(value, types):
        raise bad(f"'{key}' must be {name}, got {type(value).__name__}", key, "invalid_type")
    return value


def parse_generation(
    body, kind: str, limits: Limits, served_model: str, adapters: tuple[str, ...] = ()
) -> GenRequest:
    """Validates a `/v1/completions` (`kind="completion"`) or chat request body; `model`
    names the served model or one of its LoRA `adapters` (`GenRequest.adapter`)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    model = _typed(body, "model", (str,), served_model, "a string")
    served = (served_model, *adapters)
    if model not in served:
        raise ApiError(
            404,
            f"model '{model[:80]}' does not exist; this server serves "
            + ", ".join(f"'{m}'" for m in served),
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    n = _typed(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= MAX_CHOICES:
        raise bad(f"'n' must be between 1 and {MAX_CHOICES}, got {n}", "n")
    if _typed(body, "best_of", (int,), 1, "an integer") != 1:
        raise bad("only best_of=1 is supported", "best_of")
    req = GenRequest(kind=kind, model=model, prompt=None, n=n, adapter=served.index(model))
    if kind == "chat":
        req.messages = chat_messages(body.get("messages"))
        try:
            req.tools = tool_set(body.get("tools"), body.get("tool_choice"))
        except ToolError as e:
            raise bad(str(e), e.param) from None
        if _typed(body, "logprobs", (bool,), False, "a boolean"):
            req.logprobs = _typed(body, "top_logprobs", (int,), 0, "an integer")
            if not 0 <= req.logprobs <= 5:
                raise bad("'top_logprobs' must be between 0 and 5", "top_logprobs")
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            req.prompt = prompt
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            req.prompt_ids = list(prompt)
        elif prompt is None:
            raise bad("'prompt' is required", "prompt", "missing_required_parameter")
        else:
            raise bad(
                "'prompt' must be a string or a list of token ids (one prompt per request)",
                "prompt",
                "invalid_type",
            )
        if not (req.prompt or req.prompt_ids):
            raise bad("'prompt' is empty", "prompt")
        logprobs = _typed(body, "logprobs", (int,), None, "an integer")
        if logprobs is not None and not 0 <= logprobs <= 5:
            raise bad("'logprobs' must be between 0 and 5", "logprobs")
        req.logprobs = logprobs
        req.echo = _typed(body, "echo", (bool,), False, "a boolean")
        key = "max_tokens"
    default_max = 16 if kind == "completion" else None
    max_tokens = _typed(body, key, (int,), default_max, "an integer")
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise bad(f"'{key}' must be between 1 and {limits.max_tokens}, got {max_tokens}", key)
    req.max_tokens = max_tokens if max_tokens is not None else -1  # -1: fill the context
    seed = _typed(body, "seed", (int,), None, "an integer")
    try:  # the rules of `deepseek-tf generate` (one sampler, one set of checks)
        sampling = check_sampling(
            _typed(body, "temperature", (int, float), 1.0, "a number"),
            _typed(body, "top_k", (int,), 0, "an integer"),
            _typed(body, "top_p", (int, float), 1.0, "a number"),
            0 if seed is None else seed,
        )
        req.penalties = check_penalties(
            _typed(body, "presence_penalty", (int, float), 0.0, "a number"),
            _typed(body, "frequency_penalty", (int, float), 0.0, "a number"),
            _typed(body, "repetition_penalty", (int, float), 1.0, "a number"),
        )
    except SamplingError as e:
        raise bad(f"'{e.param}': {e}", e.param) from None
    req.temperature, req.top_k, req.top_p = sampling.temperature, sampling.top_k, sampling.top_p
    req.seed = None if seed is None else sampling.seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (
        isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
    ):
        raise bad("'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    if stop and len(stop) > MAX_STOP_STRINGS:
        raise bad(f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
    req.stop = list(stop or [])
    req.raw_logit_bias = body.get("logit_bias")
    req.stream = _typed(body, "stream", (bool,), False, "a boolean")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    req.include_usage = bool(options.get("include_usage", False))
    req.schema, req.schema_param = reply_schema(body.get("response_format"), req.tools)
    return req


def prompt_ids(
    tokenizer, prompt=None, messages=None, special=None, generation_prompt=True, tools=None
):
    """`(text, ids)` of a completion `prompt` (str) or a chat's validated `messages`, as the
    completion and chat endpoints tokenize them: a prompt with the tokenizer's BOS/EOS
    settings (`encode_prompt`), a chat through its template (the template writes its special
    tokens; `tools`, a list of OpenAI tools, is passed to it). `special` overrides whether
    those settings' special tokens are added."""
    if messages is not None:
        if tokenizer is None:
            raise bad("this model has no tokenizer: use /v1/completions with token ids", "messages")
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tools=tools
            )
            return text, tokenizer.encode_prompt(text) if special else tokenizer.encode(text)
        except Exception as e:  # the template refused the conversation, or an unknown char
            raise bad(f"the conversation cannot be rendered: {e}", "messages") from None
    if tokenizer is None:
        raise bad("this model has no tokenizer: send the prompt as token ids", "prompt")
    try:
        encode = tokenizer.encode if special is False else tokenizer.encode_prompt
        return prompt, encode(prompt)
    except Exception as e:  # e.g. a character the char tokenizer does not know
        raise bad(f"the prompt cannot be tokenized: {e}", "prompt") from None


def finalize_prompt(req: GenRequest, tokenizer, limits: Limits, vocab_size: int) -> None:
    """Tokenizes the prompt and resolves `max_tokens` against the context (in place)."""
    if req.messages is not None:
        tools = list(req.tools.tools) if req.tools and req.tools.parses else None
        req.prompt, req.prompt_ids = prompt_ids(tokenizer, messages=req.messages, tools=tools)
    elif req.prompt is not None:
        _, req.prompt_ids = prompt_ids(tokenizer, req.prompt)
    if req.schema is not None:
        req.grammar = compile_reply_grammar(req.schema, tokenizer, req.schema_param)
    try:
        req.logit_bias = check_logit_bias(req.raw_logit_bias, vocab_size)
    except SamplingError as e:
        raise bad(str(e), e.param) from None
    ids = req.prompt_ids
    if not ids:
        raise bad("the prompt is empty (no tokens)", "prompt")
    if any(not 0 <= t < vocab_size for t in ids):
        raise bad(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if len(ids) > limits.max_prompt_tokens or len(ids) >= limits.context:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; this model's context is "
            f"{limits.context} tokens (prompt limit {limits.max_prompt_tokens}, and "
            "at least one token must be left to generate)",
            "invalid_request_error",
            "context_length_exceeded",
            "prompt",
        )
    room = limits.context - len(ids)
    if req.max_tokens == -1:
        req.max_tokens = min(room, limits.max_tokens)
    elif req.max_tokens > room:
        raise ApiError(
            400,
            f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) "
            f"exceeds this model's context of {limits.context} tokens",
            "invalid_request_error",
            "context_length_exceeded",
            "max_tokens",
        )


def parse_predict(body, limits: Limits, vocab_size: int) -> tuple[list[list[int]], bool]:
    """A TF-Serving predict body -> `(token id rows, columnar)`; `columnar` for `"inputs"`."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    if ("instances" in body) == ("inputs" in body):
        raise bad("give exactly one of 'instances' or 'inputs'", "instances")
    columnar = "inputs" in body
    rows = body["inputs"] if columnar else body["instances"]
    if isinstance(rows, dict) and columnar:  # {"inputs": {"token_ids": [[...]]}}
        if len(rows) != 1:
            raise bad("'inputs' must hold one named input (the token ids)", "inputs")
        rows = next(iter(rows.values()))
    if isinstance(rows, list) and rows and all(isinstance(t, int) for t in rows):
        rows = [rows]  # a single instance
    if not isinstance(rows, list) or not rows:
        raise bad("instances must be a non-empty list of token id lists", "instances")
    if len(rows) > limits.max_instances:
        raise bad(f"at most {limits.max_instances} instances per request", "instances")
    for i, row in enumerate(rows):
        if isinstance(row, dict) and len(row) == 1:  # {"token_ids": [...]}
            rows[i] = row = next(iter(row.values()))
        if not isinstance(row, list) or not row:
            raise bad(f"instance {i} must be a non-empty list of token ids", "instances")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise bad(f"instance {i} must hold integer token ids", "instances", "invalid_type")
        if len(row) > limits.context:
            raise ApiError(
                400,
                f"instance {i} has {len(row)} tokens, more than the context of {limits.context}",
                "invalid_request_error",
                "context_length_exceeded",
                "instances",
            )
        if any(not 0 <= t < vocab_size for t in row):
            raise bad(f"instance {i}: token ids must be in [0, {vocab_size})", "instances")
    return rows, columnar
