"""Layer plumbing: `get_config` from the `__init__` signature."""

from __future__ import annotations

import inspect


def init_args(cls) -> list[str]:
    """Names of `cls.__init__`'s own arguments (not `self`, not `**kwargs`)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [
        p.name
        for p in params
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


def init_config(obj) -> dict:
    """`{arg: obj.arg}` for every `__init__` argument; a missing attribute is a bug."""
    out = {}
    for name in init_args(type(obj)):
        value = getattr(obj, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out
