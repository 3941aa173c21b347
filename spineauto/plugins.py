"""Registries that users extend by name: built-ins register themselves, a user's own class is named
as ``package.module:Name`` and imported on demand.

A :class:`Registry` maps names to objects (classes or factories) of one kind (architecture, loss,
optimiser, LR schedule, callback, task, augmentation transform). :meth:`Registry.resolve` takes a
registered name or an import string and checks the object is of the right kind before anything calls
it (a network string naming ``os:system`` is refused, never called); every failure is one line naming
the plan key, the module or the class. A standard-library module that is not imported yet is never
imported for a plug-in string (importing some acts: ``antigravity`` opens a browser); any other module
is, as any Python dependency: a model folder's plan names only the modules you installed. Nothing here crawls packages: a plug-in is found
only by the import string written in the plan (so a model folder records it and a copied model folder
needs that module importable, as any Python dependency), or by name through an installed package's
entry point in the group ``spineauto.plugins`` named ``<kind key>.<name>``, e.g. in its pyproject.toml:

```toml
[project.entry-points."spineauto.plugins"]
"loss.my_dice" = "my_package.losses:MyDice"
```
(kind keys: network, loss, optimizer, schedule, callback, task, transform).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import Any, Callable

from spineauto.errors import SpineautoError

IMPORT_STRING = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")
HINT = "or name your own as package.module:Name (importable: installed or on PYTHONPATH), or install it as a spineauto.plugins entry point"


def is_import_string(name: str) -> bool:
    return isinstance(name, str) and IMPORT_STRING.fullmatch(name) is not None


def load_object(spec: str, where: str) -> Any:
    """``package.module:Name`` (``Name`` may be dotted: ``Outer.Inner``) -> the object; one line on failure."""
    if not is_import_string(spec):
        raise SpineautoError(f"{where}: {spec!r} is not an import string (package.module:Name)")
    module_name, _, attr = spec.partition(":")
    root = module_name.split(".")[0]
    if root in sys.stdlib_module_names and module_name not in sys.modules:  # e.g. antigravity, this: importing them acts
        raise SpineautoError(f"{where}: {spec!r} names the standard-library module {module_name!r}, which holds no spineauto "
                             "plug-in; refusing to import it (name your own package.module:Name)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure while importing a user's module is theirs to fix: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SpineautoError(f"{where}: module {module_name!r} of {spec!r} does not import ({type(e).__name__}: {first}); "
                             "install it or add its folder to PYTHONPATH") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpineautoError(f"{where}: module {module_name!r} has no {attr!r}{hint}")
        obj = getattr(obj, part)
    return obj


class Registry(dict):
    """Name -> object of one ``kind``; :meth:`resolve` also accepts ``package.module:Name``.

    ``check(obj) -> str | None`` says why an imported object is the wrong kind (None: it fits).
    """

    def __init__(self, kind: str, check: Callable[[Any], str | None] | None = None, key: str = ""):
        super().__init__()
        self.kind = kind
        self.check = check
        self.key = key  # entry point names of this kind: "<key>.<name>"

    def _entry_point(self, name: str) -> str | None:
        return _entry_points().get(f"{self.key}.{name}") if self.key else None

    def register(self, name: str):
        def deco(obj):
            self[name] = obj
            return obj
        return deco

    def resolve(self, name: str, where: str) -> Any:
        if name in self:
            return self[name]
        entry = self._entry_point(name) if not is_import_string(name) else None
        if is_import_string(name) or entry is not None:
            obj = load_object(name, where) if entry is None else load_object(entry, f"{where} (entry point {self.key}.{name})")
            why = self.check(obj) if self.check is not None else None
            if why:
                raise SpineautoError(f"{where}: {name!r} is {why}, not {_a(self.kind)}")
            return obj
        close = difflib.get_close_matches(str(name), list(self), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpineautoError(f"{where}: unknown {self.kind} {name!r}{hint}; built-in: {', '.join(sorted(self))}; {HINT}")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _entry_points() -> dict[str, str]:
    """Installed packages' ``spineauto.plugins`` entry points: name -> import string."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group="spineauto.plugins")}


def describe(obj: Any) -> str:
    """'the function f', 'the class Foo', 'an int' ... for wrong-kind messages."""
    if inspect.isclass(obj):
        return f"the class {obj.__name__}"
    if callable(obj):
        return f"the function {getattr(obj, '__name__', obj)!r}"
    return _a(type(obj).__name__)


def subclass_check(*bases: type) -> Callable[[Any], str | None]:
    """A ``check`` accepting subclasses of ``bases``."""
    def check(obj: Any) -> str | None:
        if inspect.isclass(obj) and issubclass(obj, bases):
            return None
        return describe(obj) + f" (expected a subclass of {' or '.join(b.__module__ + '.' + b.__qualname__ for b in bases)})"
    return check


def bind_kwargs(fn: Callable, kwargs: dict, where: str, skip: int = 0) -> dict:
    """``kwargs`` checked against ``fn``'s signature (the first ``skip`` positional parameters are the
    caller's): an unknown name is one line naming the closest accepted one."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return dict(kwargs)
    params = list(sig.parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(kwargs)
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpineautoError(f"{where}: unknown argument {key!r}{hint}; accepted: {', '.join(accepted) or 'none'}")
    return dict(kwargs)
