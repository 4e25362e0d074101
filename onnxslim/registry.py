"""One registry of passes, fed by the ``onnxslim.passes`` entry-point group and a decorator.

Built-in passes are registered through the same entry-point group as third-party packages. Entry points
are imported only when a pass is used or listed, so a broken plugin is reported by name when touched
and never breaks the other passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, TypeVar

from .errors import PluginError, UsageError
from .pass_base import Pass

__all__ = ["register_pass", "get_pass", "available_passes", "PassEntry", "ENTRY_POINT_GROUP", "unregister_pass"]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "onnxslim.passes"

_decorated: dict[str, type[Pass]] = {}
_loaded: dict[str, type[Pass]] = {}

P = TypeVar("P", bound=type[Pass])


@dataclass
class PassEntry:
    """A registered pass as listed: its class when it loads, or the reason it does not."""

    name: str
    source: str
    cls: type[Pass] | None = None
    error: str | None = None


def _check_class(name: str, obj: object, source: str) -> type[Pass]:
    if not (isinstance(obj, type) and issubclass(obj, Pass)):
        raise PluginError(f"pass '{name}' from {source} is not an onnxslim.Pass subclass; fix the plugin's entry point")
    if not obj.name:
        obj.name = name
    elif obj.name != name:
        raise PluginError(f"pass class {obj.__name__} says its name is '{obj.name}' but is registered as '{name}'")
    return obj


def register_pass(name_or_cls: str | type[Pass] | None = None) -> Callable[[P], P] | P:
    """Register a pass class from a script or notebook: ``@register_pass`` or ``@register_pass("verb_object")``."""

    def deco(cls: P, name: str | None = None) -> P:
        name = name or cls.name
        if not name:
            raise UsageError(f"{cls.__name__}: set name = 'verb_object' on the class or pass it to @register_pass")
        cls = _check_class(name, cls, "register_pass")
        _decorated[name] = cls
        return cls

    if isinstance(name_or_cls, type):
        return deco(name_or_cls)
    return lambda cls: deco(cls, name_or_cls)


def unregister_pass(name: str) -> None:
    """Forget a pass registered with the decorator (tests and notebooks re-running cells)."""
    _decorated.pop(name, None)


def _entry_points() -> dict[str, metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    out: dict[str, metadata.EntryPoint] = {}
    for ep in eps:
        out.setdefault(ep.name, ep)
    return out


def _load_entry_point(ep: metadata.EntryPoint) -> type[Pass]:
    if ep.name in _loaded:
        return _loaded[ep.name]
    dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
    try:
        obj = ep.load()
    except Exception as e:  # a plugin's import error must not crash us
        raise PluginError(
            f"pass '{ep.name}' (from {dist}, {ep.value}) failed to import: {type(e).__name__}: {e}; "
            f"fix or reinstall that package, or uninstall it"
        ) from e
    cls = _check_class(ep.name, obj, f"{dist} ({ep.value})")
    _loaded[ep.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``."""
    if name in _decorated:
        return _decorated[name]
    eps = _entry_points()
    if name in eps:
        return _load_entry_point(eps[name])
    known = sorted(set(_decorated) | set(eps))
    hint = _closest(name, known)
    raise UsageError(
        f"unknown pass '{name}'" + (f"; did you mean '{hint}'?" if hint else "")
        + " Run 'onnxslim passes' to list them"
        + ("" if known else " (none are registered: is onnxslim installed with pip install -e .?)")
    )


def available_passes() -> list[PassEntry]:
    """Every registered pass, loading each one; broken plugins are listed with their error."""
    entries: dict[str, PassEntry] = {}
    for name, ep in _entry_points().items():
        try:
            entries[name] = PassEntry(name, ep.value, _load_entry_point(ep))
        except PluginError as e:
            entries[name] = PassEntry(name, ep.value, error=str(e))
    for name, cls in _decorated.items():
        entries[name] = PassEntry(name, f"{cls.__module__}.{cls.__qualname__}", cls)
    return [entries[k] for k in sorted(entries)]


def _closest(name: str, known: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return m[0] if m else None
