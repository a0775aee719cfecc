"""Jinja chat templates, rendered the way `transformers`' `apply_chat_template` does.

A Hugging Face checkpoint ships its chat format as a Jinja template in
`tokenizer_config.json`. `transformers` renders it in a sandboxed Jinja
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` filter that does not HTML-escape, and the globals
`raise_exception` and `strftime_now`; the template reads `messages`,
`add_generation_prompt`, `tools` and the special tokens (`bos_token`,
`eos_token`, ...). This module reproduces that environment with `jinja2` alone,
because `transformers` (and its torch) is not a runtime dependency of
deepseek-tf; `tests/tokenizers/test_chat_template.py` checks the two render the
same text.

Runs without a template of their own use `PLAIN_TEMPLATE`: one line
`"<role>: <content>\\n"` per message (an assistant's tool calls as JSON after its
content; the request's tools, when given, as a first `tools:` line), then `"assistant:"`::

    system: Be brief.
    user: Hello
    assistant:
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from deepseek_tf.errors import TokenizerError

PLAIN_TEMPLATE = (
    "{% if tools %}tools: {{ tools | tojson }}{{ '\\n' }}{% endif %}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{% if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant spans for
    training masks with it); rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja template text (`tokenizer_config.json`'s `chat_template`).
        origin: where it came from, for error messages.

    Examples:
    >>> ChatTemplate(PLAIN_TEMPLATE).render([{"role": "user", "content": "Hi"}])
    'user: Hi\\nassistant:'
    """

    def __init__(self, source: str, origin: str = "chat_template"):
        self.source = source
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"{origin}: the chat template does not compile ({e})") from None

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **special_tokens,
    ) -> str:
        """The conversation as prompt text. `special_tokens` are the template's
        `bos_token`, `eos_token`, ... strings; errors the template raises (for an
        unsupported role, say) become `TokenizerError`s naming the template."""
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"{self.origin}: {e}") from None
