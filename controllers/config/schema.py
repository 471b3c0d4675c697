"""Typed config loading: YAML + ``--set key.sub=value`` overrides -> nested dataclasses.

Errors name the full key, the value and what is accepted, and are raised before Ray starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class ConfigError(ValueError):
    """A recipe value that cannot be used; the message names key, value and what is accepted."""


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Any: "anything"}.get(tp, str(tp))


def _fail(key: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"config key '{key}': got {value!r}; accepted: {accepted}")


def coerce(tp, value: Any, key: str):
    """Check ``value`` against type ``tp`` (recursively building dataclasses)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise _fail(key, value, _describe(tp))
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None  # before a dataclass member, which would build its defaults from None
        members = get_args(tp)
        if float in members and int not in members and isinstance(value, (int, float)) and not isinstance(value, bool):
            return coerce(float, value, key)  # a number for a number-or-null key: say why it is refused
        sections = [a for a in members if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:
            return coerce(sections[0], value, key)  # a section: its own error names the key inside it
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(arg, value, key)
            except ConfigError:
                continue  # the message names the whole union, not the last member tried
        raise _fail(key, value, _describe(tp))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, _describe(tp))
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _fail(key, value, f"a list of {len(args)} items")
            return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, value, "a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(key, value, "an integer")
    if tp is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 2e-3, without a dot, as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            if not math.isfinite(number):
                raise _fail(key, value, "a finite number (not NaN or infinite)")
            return number
        raise _fail(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, value, "a string")
    raise TypeError(f"schema type {tp!r} at '{key}' is not supported")


def build(cls, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise _fail(prefix or "<root>", data, _describe(cls))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        if unknown[0] in getattr(cls, "RENAMED", {}):  # a key a dataclass no longer has: say what replaced it
            raise ConfigError(f"config key {where} was replaced by {cls.RENAMED[unknown[0]]}")
        raise ConfigError(f"config key {where} is not known; accepted keys{' under ' + repr(prefix) if prefix else ''}: "
                          + ", ".join(sorted(fields)))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(hints[name], value, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(data: dict, assignment: str) -> None:
    """``a.b.c=value``: the value is parsed as YAML (so 3 is an int, true a bool, [1,2] a list)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({e})") from None
    set_key(data, key.strip(), value, f"--set {assignment!r}")


def set_key(data: dict, key: str, value, where: str) -> None:
    """``data[a][b][c] = value`` for the dotted ``key`` "a.b.c" (mappings made as needed)."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{where}: empty key segment in {key!r}")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a mapping")
        node = child
    node[parts[-1]] = value
