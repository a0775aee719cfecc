"""YAML presets + files + typed `--set section.key=value` overrides -> `Config`.

Unknown sections or keys and values of the wrong type are `ConfigError`s that
name the offending key, e.g. ``model.n_layrs: unknown key``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deepseek_tf.config.schema import SECTIONS, Config
from deepseek_tf.config.validation import validate
from deepseek_tf.errors import ConfigError

DEFAULT_PRESET = "shakespeare-char"
# Keys that once lived under `model:` and now have their own section: a run's old
# config.yaml, a YAML file or `--set model.KEY=...` naming them there is read into it.
MOVED_KEYS = {
    "layer_n_heads": "compression",
    "layer_ffn_dims": "compression",
    "layer_n_experts": "compression",
    "lowrank": "compression",
    "fake_quant": "compression",
    "quantize": "compression",
    "quantize_include": "compression",
    "quantize_bits": "compression",
    "quantize_group_size": "compression",
    "logit_temperature": "calibration",
}
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


PRESETS_ENV = "DEEPSEEK_TF_PRESETS"  # more preset folders (os.pathsep-separated)


def _preset_folders() -> list:
    """The bundled presets, then the folders named by `$DEEPSEEK_TF_PRESETS` (a project's
    own presets; the test suite keeps its few-second models there)."""
    extra = [Path(p) for p in os.environ.get(PRESETS_ENV, "").split(os.pathsep) if p]
    return [resources.files("deepseek_tf") / "presets", *extra]


def _preset_file(name: str):
    for folder in _preset_folders():
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def preset_names() -> list[str]:
    """Names of the YAML presets: the bundled ones (`deepseek_tf/presets`) and those in
    the folders of `$DEEPSEEK_TF_PRESETS`."""
    names = set()
    for folder in _preset_folders():
        if folder.is_dir():
            names.update(
                p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")
            )
    return sorted(names)


def preset_description(name: str) -> str:
    """The first sentence of a preset's leading comment (one line for `info --presets`)."""
    text = _preset_file(name).read_text("utf-8")
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    words = " ".join(lines)
    end = words.find(". ")
    sentence = words if end < 0 else words[: end + 1]
    if len(sentence) > 100:
        sentence = sentence[:97].rsplit(" ", 1)[0].rstrip(",:;(") + "..."
    return sentence


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (YAML itself keeps
    the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{key!r} is given twice (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str):
    """YAML text -> Python objects, every failure a one-line `ConfigError` naming `source`.

    Refuses duplicate keys, nesting too deep to parse, and integers too long for Python
    (more than 4,300 digits).
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string ..."
        raise ConfigError(f"{source}: unreadable value ({str(e).splitlines()[0]})") from None


def _read_yaml(text: str, source: str) -> dict:
    data = parse_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return data


def read_text_file(path, what: str) -> str:
    """The UTF-8 text of a regular file, or a one-line `ConfigError` naming it."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} not found: {p}")
    if not p.is_file():
        raise ConfigError(f"{what} {p} is not a regular file")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {p} is not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{what} {p} cannot be read ({e.strerror})") from None


def preset_dict(name: str) -> dict:
    """The raw mapping of preset `name`."""
    path = _preset_file(name) if name in preset_names() else None  # a name, never a path
    if path is None:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return _read_yaml(path.read_text(encoding="utf-8"), f"preset {name}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; returns it in canonical form."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            if option is not type(None):
                try:
                    return _coerce(value, option, key)
                except ConfigError:
                    pass
    else:  # pragma: no cover - a schema bug, not user input
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _build_section(section: str, values: Mapping[str, Any]) -> Any:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(hints))})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def moved_key(section: str, key: str) -> tuple[str, str]:
    """`(section, key)` where the schema keeps `section.key` now (`MOVED_KEYS`), e.g.
    ``moved_key("model", "quantize") == ("compression", "quantize")``."""
    if section == "model" and key in MOVED_KEYS:
        return MOVED_KEYS[key], key
    return section, key


def _moved_name(name: str) -> str:
    """A `section.key` name where the schema keeps it now (`moved_key`)."""
    section, dot, key = name.partition(".")
    return ".".join(moved_key(section, key)) if dot else name


def _migrated(raw: Mapping, source: str) -> Mapping:
    """`raw` (a mapping of sections) with the `MOVED_KEYS` under `model` moved to their
    section; one given in both places is a `ConfigError`."""
    model = raw.get("model")
    if not isinstance(model, Mapping) or not MOVED_KEYS.keys() & model.keys():
        return raw
    out = {k: v for k, v in raw.items() if k != "model"}
    out["model"] = {}
    for key, value in model.items():
        section, _ = moved_key("model", key)
        if section == "model":
            out["model"][key] = value
            continue
        target = out.get(section) or {}
        if not isinstance(target, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        if key in target:
            raise ConfigError(
                f"{source}: model.{key} (the old place) and {section}.{key} are both given"
            )
        out[section] = {**target, key: value}
    return out


def _merge(base: dict, extra: Mapping, source: str) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in _migrated(extra, source).items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {section!r} (known: {', '.join(SECTIONS)})"
            )
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        out.setdefault(section, {}).update(values)
    return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parses ``section.key=value`` (the value is read as YAML: 3, 1e-3, true, [a, b])."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    section, key = moved_key(*path.strip().split(".", 1))
    try:
        value = parse_yaml(raw, f"--set {path}") if raw.strip() else ""
    except ConfigError as e:
        if "not valid YAML" not in str(e):
            raise
        value = raw  # e.g. a glob like data/*.txt: taken as a string
    if section not in SECTIONS:
        raise ConfigError(
            f"--set {path}: unknown section {section!r} (known: {', '.join(SECTIONS)})"
        )
    return section, key, value


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Resolves a `Config` from a preset and/or a YAML file plus overrides.

    With neither `preset` nor `path`, the default preset is used. A file may
    name its own base preset with a top-level ``preset: NAME`` entry.
    """
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(read_text_file(path, "config file"), str(path))
        if not raw:  # never silently the defaults
            raise ConfigError(
                f"config file {path} is empty: name a base preset (`preset: NAME`) and/or "
                "give sections (model:, data:, train:, ...)"
            )
        preset = raw.pop("preset", None) or preset
    merged: dict = {}
    if preset is not None or path is None:
        merged = _merge(merged, preset_dict(preset or DEFAULT_PRESET), f"preset {preset}")
    merged = _merge(merged, raw, str(path))
    explicit = _keys_of(_migrated(raw, str(path)))  # the file's and --set's (not the preset's)
    for text in overrides:
        section, key, value = parse_override(text)
        merged = _merge(merged, {section: {key: value}}, f"--set {text}")
        explicit.add(f"{section}.{key}")
    return config_from_dict(merged, explicit=explicit)


def _keys_of(raw: Mapping) -> set[str]:
    return {
        f"{section}.{key}"
        for section, values in raw.items()
        if isinstance(values, Mapping)
        for key in values
    }


def config_from_dict(data: Mapping[str, Any], explicit: Iterable[str] = ()) -> Config:
    """Builds and validates a `Config` from a nested mapping.

    `explicit` names the keys the user set (`section.key`); one the model never reads
    is refused (a key inherited from a preset is not).
    """
    merged = _merge({}, data, "config")
    explicit = {_moved_name(name) for name in explicit}
    sections = {name: _build_section(name, merged.get(name, {})) for name in SECTIONS}
    config = Config(**sections)
    validate(config, explicit)
    return config


def config_to_dict(config: Config) -> dict:
    out = {}
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(config, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    return out


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML text (what a run directory's ``config.yaml`` holds)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_from_yaml(text: str, source: str) -> Config:
    """A `Config` from YAML text of sections (a run's ``config.yaml``)."""
    return config_from_dict(_read_yaml(text, source))


def update_config(config: Config, **changes: Mapping[str, Any]) -> Config:
    """The one door through which a `Config` changes: `config` with the changes of each
    section applied, type-checked and validated again, e.g.
    ``update_config(config, train={"batch_size": 8}, model={"mtp_depth": 0})``.

    An unknown section or key, a value of the wrong type or a combination the validator
    refuses is a `ConfigError` naming the key.

    Examples:

    >>> from deepseek_tf.config.loader import load_config, update_config
    >>> update_config(load_config("tiny"), train={"steps": 7}).train.steps
    7
    """
    merged = config_to_dict(config)
    for section, values in changes.items():
        merged = _merge(merged, {section: dict(values)}, f"changes to {section}")
    return config_from_dict(merged)


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """`config` with `--set section.key=value` overrides applied (type-checked)."""
    merged = config_to_dict(config)
    explicit = set()
    for text in overrides:
        section, key, value = parse_override(text)
        merged = _merge(merged, {section: {key: value}}, f"--set {text}")
        explicit.add(f"{section}.{key}")
    return config_from_dict(merged, explicit=explicit)
