"""Tool calling: OpenAI `tools`/`tool_choice`, and DeepSeek's tool-call tokens parsed back.

A DeepSeek chat model calls tools by writing special tokens after (or instead of) its
text. DeepSeek-V3 writes the call's type, its name and the arguments in a JSON fence::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Zürich"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

DeepSeek-V3.1 drops the type and the fence
(`<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Zürich"}<｜tool▁call▁end｜>`); both
are read, as vLLM's `deepseek_v3` and `deepseek_v31` tool parsers read them. The text
before the first marker is the reply's `content`; each complete call becomes an OpenAI
`tool_calls` item (`arguments` as the JSON text written, normalised when it parses).
A call cut off before its end marker (the reply ran out of tokens) is dropped; output
with a begin marker but no complete call is returned whole as content.

`ToolCallStream` does the same on a stream: content is passed on as it comes, except a
tail that could be the start of the begin marker, and each call goes out as one delta
once its end marker arrives.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
TOOL_CHOICES = ("none", "auto", "required")
MAX_TOOLS = 128


class ToolError(ValueError):
    """A malformed `tools` or `tool_choice` (the message names the field)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSet:
    """A request's validated tools.

    Attributes:
        tools: the OpenAI tool objects as sent (`{"type": "function", "function": {...}}`).
        choice: `"none"`, `"auto"`, `"required"`, or the name of the function to call.
    """

    tools: tuple[dict, ...]
    choice: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)

    @property
    def parses(self) -> bool:
        """Whether the reply is read for tool calls (`tool_choice` is not `"none"`)."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the reply must be a call (`required` or a named function): decoding is
        then held to `forced_schema`."""
        return self.choice not in ("none", "auto")

    def parameters(self, name: str) -> dict:
        """The JSON Schema of function `name`'s arguments (`{"type": "object"}` if none)."""
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)


def _function(tool, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ToolError(f"{where} must be an object with type 'function'", "tools")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ToolError(f"{where}.function must be an object", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ToolError(f"{where}.function.name must be a string of 1 to 64 characters", "tools")
    if not all(c.isalnum() or c in "_-." for c in name):
        raise ToolError(f"{where}.function.name may hold letters, digits, '_', '-', '.'", "tools")
    if not isinstance(fn.get("description", ""), str):
        raise ToolError(f"{where}.function.description must be a string", "tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ToolError(f"{where}.function.parameters must be a JSON Schema object", "tools")
    return {"type": "function", "function": fn}


def tool_set(tools, tool_choice) -> ToolSet | None:
    """The request's `tools` and `tool_choice` validated (None without tools).

    Raises:
        ToolError: a malformed tool, a `tool_choice` that is not one of `none`, `auto`,
            `required`, `{"type": "function", "function": {"name": ...}}`, or names a
            function that is not in `tools`.
    """
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ToolError("'tools' must be a non-empty list of tools", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools are allowed", "tools")
    checked = tuple(_function(t, i) for i, t in enumerate(tools))
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise ToolError("tool names must be unique", "tools")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        choice = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(choice, str) or choice not in names:
            raise ToolError(
                "'tool_choice' must name a function of 'tools' as "
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
    elif choice not in TOOL_CHOICES:
        raise ToolError(
            f"'tool_choice' must be one of {list(TOOL_CHOICES)} or a function", "tool_choice"
        )
    return ToolSet(checked, choice)


def call_item(name: str, arguments: str, index: int | None = None) -> dict:
    """An OpenAI `tool_calls` item (with `index` for a stream delta)."""
    item = {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    return item if index is None else {"index": index, **item}


def _normalised(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        return arguments  # passed on as written, as vLLM does


def parse_call(body: str) -> tuple[str, str] | None:
    """`(name, arguments)` of the text between a call's begin and end markers, or None."""
    head, sep, rest = body.partition(SEP)
    if not sep:
        return None
    if "```" in rest:  # V3: "function<｜tool▁sep｜>NAME\n```json\nARGS\n```"
        name, _, fenced = rest.partition("\n")
        fenced = fenced.strip()
        if not fenced.startswith("```") or not fenced.endswith("```"):
            return None
        arguments = fenced[3:-3]
        arguments = arguments[4:] if arguments.startswith("json") else arguments
    else:  # V3.1: "NAME<｜tool▁sep｜>ARGS"
        name, arguments = head, rest
    name = name.strip()
    return (name, _normalised(arguments.strip())) if name else None


def _calls(section: str) -> list[tuple[str, str]]:
    """The complete calls of the text after the begin marker (an unclosed one dropped)."""
    calls = []
    for piece in section.split(CALL_BEGIN)[1:]:
        body, closed, _ = piece.partition(CALL_END)
        parsed = parse_call(body) if closed else None
        if parsed is not None:
            calls.append(parsed)
    return calls


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """`(content, tool_calls)` of a whole reply (content None when it is empty).

    Examples:
    >>> content, calls = parse_tool_calls(
    ...     "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜>")
    >>> content, calls[0]["function"]
    ('Sure.', {'name': 'f', 'arguments': '{}'})
    """
    content, begin, section = text.partition(CALLS_BEGIN)
    calls = _calls(section) if begin else []
    if not calls:
        return text or None, []
    return content or None, [call_item(name, args) for name, args in calls]


def _held_back(text: str) -> int:
    """Length of the longest tail of `text` that begins the begin marker."""
    for n in range(min(len(text), len(CALLS_BEGIN) - 1), 0, -1):
        if CALLS_BEGIN.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """Splits a streamed reply into content deltas and tool-call deltas.

    `feed(text)` returns `(content, calls)`: the content that is safe to send and the
    calls completed by this text (stream delta items with their `index`); `close()`
    returns what is left: the held-back tail, or a begin marker with no complete call
    as content.
    """

    def __init__(self):
        self.pending = ""  # content held back (may start the begin marker)
        self.section: str | None = None  # text after the begin marker
        self.sent_calls = 0

    @property
    def called(self) -> bool:
        return self.sent_calls > 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if self.section is None:
            text = self.pending + text
            content, begin, rest = text.partition(CALLS_BEGIN)
            if not begin:
                keep = _held_back(text)
                self.pending = text[len(text) - keep :] if keep else ""
                return text[: len(text) - keep], []
            self.pending, self.section = "", ""
            return content, self._new_calls(rest)
        return "", self._new_calls(text)

    def _new_calls(self, text: str) -> list[dict]:
        self.section += text
        calls = _calls(self.section)[self.sent_calls :]
        items = [call_item(n, a, self.sent_calls + i) for i, (n, a) in enumerate(calls)]
        self.sent_calls += len(items)
        return items

    def close(self) -> str:
        if self.section is None:
            return self.pending
        return "" if self.called else CALLS_BEGIN + self.section


def forced_schema(tools: ToolSet) -> dict:
    """The JSON Schema a reply is held to when `tool_choice` forces a call: a named
    function's parameters, or (`required`) a non-empty array of `{"name", "parameters"}`
    (as vLLM constrains both)."""
    if tools.choice != "required":
        return tools.parameters(tools.choice)
    options = [
        {
            "type": "object",
            "properties": {"name": {"enum": [name]}, "parameters": tools.parameters(name)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name in tools.names
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": options}}


def forced_calls(tools: ToolSet, text: str) -> list[dict]:
    """The `tool_calls` of a reply written under `forced_schema` (none if it is not
    complete JSON, e.g. cut off by `max_tokens`)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if tools.choice != "required":
        return [call_item(tools.choice, json.dumps(value, ensure_ascii=False))]
    return [
        call_item(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
        for c in value
        if isinstance(c, dict) and "name" in c and "parameters" in c
    ]
