"""Typed plain data: dataclasses <-> JSON-ready dicts, validated field by field on load."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from spineauto.errors import SpineautoError

T = TypeVar("T")
QUOTE = 200  # the most characters of a value (or of a file) an error message quotes


def quote(value: Any, limit: int = QUOTE) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message stays one short line whatever the value."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
            raise SpineautoError(f"{where}: unknown key(s) {quote(unknown)}{hint}; known: {sorted(fields)}")
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
        raise SpineautoError(errors[0] if errors else f"{where}: invalid value {quote(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SpineautoError(f"{where}: expected a list, got {quote(value)}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpineautoError(f"{where}: expected an object, got {quote(value)}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise SpineautoError(f"{where}: {quote(value)} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpineautoError(f"{where}: expected a number, got {quote(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpineautoError(f"{where}: expected an integer, got {quote(value)}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise SpineautoError(f"{where}: expected {tp.__name__}, got {quote(value)}")
        return value
    return value


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


MAX_YAML_BYTES = 1 << 20  # a run YAML, preset or pipeline definition is a few KB


MAX_YAML_VALUES = 20_000  # values of a document with its aliases expanded; our largest preset has a few hundred


def _yaml_loader():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a document whose aliases (``*name``) expand it beyond
        :data:`MAX_YAML_VALUES` values, or refer to themselves: a few nested aliases ("billion laughs")
        turn a file of a few hundred bytes into gigabytes for whatever walks or prints the result."""

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                _expanded_size(node, {}, set())
            return node
    return BoundedLoader


def _expanded_size(node, memo: dict, active: set) -> int:
    """How many values ``node`` holds with every alias expanded (shared nodes counted once per use)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise yaml.composer.ComposerError(None, None, "an alias refers to the value that holds it", node.start_mark)
    active.add(key)
    size = 1
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    for child in children:
        size += _expanded_size(child, memo, active)
        if size > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(None, None, f"aliases expand it beyond {MAX_YAML_VALUES} values (a 'billion laughs'?); "
                                              "write the values out", node.start_mark)
    active.discard(key)
    memo[key] = size
    return size


def load_yaml_text(text: str, where: str):
    """YAML ``text`` as plain data, bounded (see :func:`_yaml_loader`); one short line on bad YAML."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise SpineautoError(f"{where}: invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or str(e).splitlines()[0]).split())
        raise SpineautoError(f"{where}: invalid YAML{at} ({problem[:QUOTE]})") from None


def load_yaml_mapping(path, what: str, missing_hint: str) -> dict:
    """A YAML file that must hold a mapping; one-line errors for a missing file, a file too large or
    not UTF-8, bad YAML (aliases included) or another shape."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise SpineautoError(f"{path}: {what} not found; {missing_hint}")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise SpineautoError(f"{path}: {size} bytes is too large for a {what} (at most {MAX_YAML_BYTES}); pass the YAML file itself")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpineautoError(f"{path}: a {what} is UTF-8 text, but byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8; "
                             "save it as UTF-8") from None
    except OSError as e:
        raise SpineautoError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    data = load_yaml_text(text, str(path))
    if not isinstance(data, dict):
        raise SpineautoError(f"{path}: a {what} is a mapping (key: value lines), not a {type(data).__name__}")
    return data
