"""Typed recipe configs: nested dataclasses read from YAML, with `--key=value` overrides.

A recipe is a dataclass whose fields are plain values or other dataclasses. Every key in a
YAML file or an override must name an existing field: a typo is an error naming the file
and the key, never silently ignored (a silently ignored learning rate is a lost day).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from athanor.errors import AthanorError
from athanor.io import atomic_write_text

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert a YAML value or an override string to the field's declared type."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise AthanorError(f"{key} may not be empty", path=source)
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise AthanorError(f"{key} must be a mapping of its own keys", path=source)
        return from_dict(inner, value, source=source, prefix=key + ".")
    origin = typing.get_origin(inner)
    if origin is list:
        (item_tp,) = typing.get_args(inner) or (Any,)
        if isinstance(value, str):  # "a,b", or YAML's flow style "[a, b]"
            if value.startswith("[") and value.endswith("]"):
                value = value[1:-1]
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise AthanorError(f"{key} must be a list", path=source)
        return [_coerce(v, item_tp, key, source) for v in value]
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise AthanorError(f"{key} must be one of {list(choices)}, got {value!r}", path=source)
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise AthanorError(f"{key} must be true or false, got {value!r}", path=source)
    if inner in (int, float, str):
        try:
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if inner is int and isinstance(value, str):
                return int(float(value)) if "e" in value.lower() else int(value)
            return inner(value)
        except ValueError:
            raise AthanorError(f"{key} must be {inner.__name__}, got {value!r}", path=source) from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "<recipe>", prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise AthanorError(f"unknown recipe key {prefix + unknown[0]!r} "
                           f"(known keys here: {', '.join(sorted(types_))})", path=source)
    kwargs = {k: _coerce(v, types_[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AthanorError("recipe file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise AthanorError(f"not valid YAML: {getattr(e, 'problem', e)}", path=path,
                           line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise AthanorError("a recipe must be a mapping of keys to values", path=path)
    return data


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise AthanorError(f"override {dotted!r}: {p!r} is a value, not a section", path="--override")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['--train.lr=3e-4', 'model.hidden_size=256']` -> nested dict of strings."""
    data: dict[str, Any] = {}
    for arg in args:
        body = arg[2:] if arg.startswith("--") else arg
        if "=" not in body:
            raise AthanorError(f"override {arg!r} must look like --key=value (e.g. --train.lr=3e-4)",
                               path="--override")
        key, value = body.split("=", 1)
        _set_nested(data, key.replace("-", "_"), value)
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(cls: type[T], recipe: str | Path | None, overrides: list[str]) -> T:
    """Defaults of `cls`, then the YAML file (if any), then the overrides; unknown keys are errors."""
    data = to_dict(cls())
    if recipe is not None:
        data = merge(data, load_yaml(recipe))
        from_dict(cls, data, source=str(recipe))  # a bad key in the file is reported with the file's name
    return from_dict(cls, merge(data, parse_overrides(overrides)), source="--override")

def save_yaml(obj: Any, path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(obj), sort_keys=False))
