"""YAML configs validated into typed dataclasses.

Every config in svlib is a (nested) dataclass. ``from_dict`` walks the dataclass fields and the YAML
mapping together, so an unknown key, a missing required key or a value of the wrong type is reported
with its dotted path (``train.optim.lr_frontend: expected float, got 'abc'``) instead of surfacing later
as an obscure failure deep inside a stage.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from svlib.files import write_text_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or mapping that does not match its schema."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: no matching type ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = get_args(tp) or (Any, Any)
        return {_convert(key_t, k, where): _convert(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads "1e-4" as a string; accept it as a float since that is what everyone writes.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf: a NaN learning rate trains nothing, silently
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly (unknown keys are errors)."""
    label = where or cls.__name__
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{label}: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the
    last value silently, so a second ``lr_backend:`` further down a long stage file would win unseen."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first given on "
                                  f"line {seen[key]}); a mapping may give each key once")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """The raw YAML content of a config file (not validated); errors name the file. Duplicate keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if data is None:  # an empty (or all-comment) file would otherwise give every default without a word
        raise ConfigError(f"{path}: empty config file (no keys); write the settings, or '{{}}' for all defaults")
    return data


def load_config(path: str | os.PathLike, cls: type[T], overrides: dict | None = None) -> T:
    """Read a YAML file into ``cls``; errors name the file. ``overrides`` (a partial mapping of ``cls``, already
    checked with :func:`check_overrides`) is deep-merged into the file's mapping before validation."""
    data = read_yaml(path)
    if overrides:
        data = merge_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}{' (with overrides)' if overrides else ''}: {err}") from None


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass a field holds (``X``, ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        found = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def check_overrides(cls: type, overrides: Any, where: str = "") -> None:
    """A partial mapping of ``cls``: every key must be a field, recursively into dataclass-valued fields, so a
    typo in an overrides file is an error with its dotted path (values are type-checked after the merge)."""
    label = where or cls.__name__
    if not isinstance(overrides, dict):
        raise ConfigError(f"{label}: expected a mapping, got {overrides!r}")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    for key, value in overrides.items():
        inner = _dataclass_of(hints[key])
        if inner is not None and isinstance(value, dict):
            check_overrides(inner, value, f"{where}.{key}" if where else key)


def merge_overrides(base: Any, overrides: dict) -> dict:
    """``base`` with ``overrides`` deep-merged in: mappings merge key by key, any other value (lists too)
    replaces the base's. Neither argument is modified."""
    merged = dict(base) if isinstance(base, dict) else {}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict/list structure, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def save_config(obj: Any, path: str | os.PathLike) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` (lists stay values), for MLflow params."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def check_relative(path: str | None, key: str) -> str | None:
    """Configs carry no absolute paths: they must work on every machine of a team."""
    if path is not None and os.path.isabs(path):
        raise ConfigError(f"{key}: absolute paths are not allowed in configs ({path!r}); use a path relative to the repo")
    return path
