"""OpenAI chat `messages` validated for the chat template: roles, text parts, an
assistant's `tool_calls` and a tool result's `tool_call_id`."""

from __future__ import annotations

import json

from deepseek_tf.serving.api_errors import bad

CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's `tool_calls`, each `{"id", "type", "function": {"name",
    "arguments"}}` with the arguments as JSON text (as OpenAI clients send them)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise bad(f"{where} must be a non-empty list", "messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        arguments = fn.get("arguments", "{}") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, (str, dict)):
            raise bad(f"{where} items need function.name and function.arguments", "messages")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        ident = call.get("id", "")
        out.append(
            {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}
        )
    return out


def chat_messages(messages) -> list[dict]:
    """Validated OpenAI chat `messages` as `[{"role", "content": str}, ...]` (text parts
    joined), ready for the tokenizer's chat template; an assistant message keeps its
    `tool_calls` (its content may then be null), a tool message its `tool_call_id`."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages", "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role must be one of {list(CHAT_ROLES)}", "messages")
        calls = m.get("tool_calls") if role == "assistant" else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise bad(f"messages[{i}].content parts must be text", "messages")
            content = "".join(parts)
        if content is None and calls is not None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages", "invalid_type")
        message = {"role": role, "content": content}
        if calls is not None:
            message["tool_calls"] = _tool_calls(calls, i)
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out
