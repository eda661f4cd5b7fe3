"""Typed YAML configs: nested dataclasses with defaults for every field, validated on load.

An unknown key, a wrong type or a bad value fails at start with one line naming the dotted key, e.g.
``config: train.epochs: expected int, got 'ten'``. ``key=value`` overrides use the same dotted names.

Inheritance: a top-level ``base: <path relative to this file>`` loads that file first (recursively; a cycle
is an error naming the files) and deep-merges this file over it:

- mapping over mapping: merged key by key (recursively);
- scalar over a mapping whose section has a ``SHORTHAND`` field: sets that field and keeps the base's other
  fields (``loss: sampled`` over ``loss: {name: full, temperature: 0.5}`` -> ``{name: sampled, temperature:
  0.5}``); mapping over a base shorthand scalar: the scalar is expanded first (``{name: <scalar>}``);
- anything else (scalars, lists, ``null``) replaces the base value; ``null`` resets a section to its defaults.

Without a schema (``load_yaml(path)``), every nested section is assumed to use ``name`` as its shorthand, like
``apply_overrides``; with ``load_yaml(path, schema=TrainConfig)`` the dataclasses' own ``SHORTHAND`` is used.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key."""


_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        seq = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and converting/validating types.

    A dataclass may define ``SHORTHAND`` (a field name): a scalar in place of the mapping sets that
    field (``objective: cloze`` == ``objective: {name: cloze}``).
    """
    shorthand = getattr(cls, "SHORTHAND", None)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        if shorthand is None:
            raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
        data = {shorthand: data}
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe dict of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else {"name": child}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


BASE_KEY = "base"
DEFAULT_SHORTHAND = "name"  # the shorthand field assumed when merging without a schema (as in apply_overrides)


def _section(schema: Any, key: str) -> Any:
    """The dataclass type of field ``key`` of dataclass ``schema`` (None if unknown or not a dataclass)."""
    if schema is None or not dataclasses.is_dataclass(schema):
        return None
    tp = get_type_hints(schema).get(key)
    return tp if tp is not None and dataclasses.is_dataclass(tp) else None


def deep_merge(base: dict, over: dict, schema: type | None = None, *, typed: bool | None = None) -> dict:
    """``over`` merged over ``base`` (neither is modified); the rules are in the module docstring.

    ``schema`` (a config dataclass) tells which sections have a ``SHORTHAND`` field; without one, nested
    sections are assumed to use ``name``.
    """
    typed = schema is not None if typed is None else typed
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        sub = _section(schema, key)
        shorthand = getattr(sub, "SHORTHAND", None) if typed else DEFAULT_SHORTHAND
        scalar_value = value is not None and not isinstance(value, (dict, list))
        scalar_old = old is not None and not isinstance(old, (dict, list))
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = deep_merge(old, value, sub, typed=typed)
        elif isinstance(old, dict) and scalar_value and shorthand:
            out[key] = {**old, shorthand: value}
        elif scalar_old and isinstance(value, dict) and shorthand:
            out[key] = deep_merge({shorthand: old}, value, sub, typed=typed)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _load(path: Path, schema: type | None, chain: tuple[tuple[Path, Path], ...]) -> dict:
    data = _read_yaml(path)
    if BASE_KEY not in data:
        return data
    ref = data.pop(BASE_KEY)
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{path}: {BASE_KEY}: expected a path relative to this file, got {ref!r}")
    base = Path(os.path.normpath(path.parent / ref))
    chain = (*chain, (path.resolve(), path))
    if base.resolve() in {resolved for resolved, _ in chain}:
        names = " -> ".join(str(shown) for _, shown in chain)
        raise ConfigError(f"{path}: {BASE_KEY}: inheritance cycle {names} -> {base}")
    if not base.is_file():
        raise ConfigError(f"{path}: {BASE_KEY}: no such config file {base}")
    return deep_merge(_load(base, schema, chain), data, schema)


def load_yaml(path: str | Path, schema: type | None = None) -> dict:
    """The top-level mapping of a YAML config, with ``base:`` inheritance resolved (see the module docstring).

    ``schema``: the config dataclass, used only to find the sections' ``SHORTHAND`` fields while merging.
    """
    return _load(Path(path), schema, ())
