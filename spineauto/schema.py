"""Typed plain data: dataclasses <-> JSON-ready dicts, validated field by field on load."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from spineauto.errors import SpineautoError

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build ``cls`` from ``data``; unknown keys, missing keys and wrong types raise SpineautoError."""
    return _convert(cls, data, where or cls.__name__)


def convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` as the type hint ``tp`` (dataclasses, lists, dicts, unions, literals, numbers): one line naming ``where`` otherwise."""
    return _convert(tp, value, where)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpineautoError(f"{where}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpineautoError(f"{where}: unknown key(s) {unknown}{hint}; known: {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpineautoError(f"{where}: missing key {name!r}")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except SpineautoError as e:
                errors.append(str(e))
        raise SpineautoError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SpineautoError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpineautoError(f"{where}: expected an object, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise SpineautoError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpineautoError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpineautoError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise SpineautoError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml_mapping(path, what: str, missing_hint: str) -> dict:
    """A YAML file that must hold a mapping; one-line errors for a missing file, bad YAML or another shape."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpineautoError(f"{path}: {what} not found; {missing_hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpineautoError(f"{path}: invalid YAML{at} ({problem})") from None
    if not isinstance(data, dict):
        raise SpineautoError(f"{path}: a {what} is a mapping (key: value lines), not a {type(data).__name__}")
    return data
