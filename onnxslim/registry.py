"""One registry of passes, fed by the ``onnxslim.passes`` entry-point group and a decorator.

Built-in passes are registered through the same entry-point group as third-party packages. Entry points
are imported only when a pass is used or listed, so a broken plugin is reported by name when touched
and never breaks the other passes. One name, one pass: a name claimed twice (two packages, or a decorated
class reusing a registered name) is an error that names both sources, never a silent replacement.

In a plain checkout (nothing installed, so no entry points of ours), the built-ins are read from the
checkout's pyproject.toml, the same table the install registers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypeVar

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


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_pass(name_or_cls: str | type[Pass] | None = None) -> Callable[[P], P] | P:
    """Register a pass class from a script or notebook: ``@register_pass`` or ``@register_pass("verb_object")``.

    A name already taken by another pass (a built-in, a plugin, or another decorated class) is an error;
    registering the same class again (a notebook cell run twice) replaces it."""

    def deco(cls: P, name: str | None = None) -> P:
        name = name or cls.name
        if not name:
            raise UsageError(f"{cls.__name__}: set name = 'verb_object' on the class or pass it to @register_pass")
        eps = _entry_points()
        if name in eps:
            raise PluginError(
                f"pass name '{name}' is taken by {_source(eps[name])}; {_where(cls)} cannot register "
                "it too: give the class another name (verb_object)"
            )
        old = _decorated.get(name)
        if old is not None and _where(old) != _where(cls):
            raise PluginError(
                f"pass name '{name}' is taken by {_where(old)} (register_pass); {_where(cls)} cannot "
                "register it too: give the class another name, or unregister_pass the old one"
            )
        cls = _check_class(name, cls, "register_pass")
        _decorated[name] = cls
        return cls

    if isinstance(name_or_cls, type):
        return deco(name_or_cls)
    return lambda cls: deco(cls, name_or_cls)


def unregister_pass(name: str) -> None:
    """Forget a pass registered with the decorator (tests and notebooks re-running cells)."""
    _decorated.pop(name, None)


def _all_entry_points() -> dict[str, list[metadata.EntryPoint]]:
    """Name -> every distinct entry point claiming it (more than one is a conflict)."""
    out: dict[str, list[metadata.EntryPoint]] = {}
    found = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    if not any(ep.value.startswith("onnxslim.passes.") for ep in found):
        found += _checkout_entry_points()
    for ep in found:
        claims = out.setdefault(ep.name, [])
        if all(ep.value != other.value for other in claims):  # the same package seen twice is one claim
            claims.append(ep)
    return out


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {name: claims[0] for name, claims in _all_entry_points().items()}


def _checkout_entry_points() -> list[metadata.EntryPoint]:
    """The built-ins of a plain checkout, from its pyproject.toml (the table the install registers)."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return []
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        table = tomllib.loads(pyproject.read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    except (KeyError, ValueError):
        return []
    return [metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in table.items()]


def _source(ep: metadata.EntryPoint) -> str:
    dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
    return f"{dist} ({ep.value})"


def _conflict(name: str) -> PluginError | None:
    claims = _all_entry_points().get(name, [])
    if len(claims) < 2:
        return None
    return PluginError(
        f"pass name '{name}' is claimed by {' and by '.join(_source(ep) for ep in claims)}; "
        "uninstall one of them (one name, one pass)"
    )


def _load_entry_point(ep: metadata.EntryPoint) -> type[Pass]:
    if ep.name in _loaded:
        return _loaded[ep.name]
    try:
        obj = ep.load()
    except Exception as e:  # a plugin's import error must not crash us
        raise PluginError(
            f"pass '{ep.name}' (from {_source(ep)}) failed to import: {type(e).__name__}: {e}; "
            f"fix or reinstall that package, or uninstall it"
        ) from e
    cls = _check_class(ep.name, obj, _source(ep))
    _loaded[ep.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``."""
    if name in _decorated:
        return _decorated[name]
    eps = _entry_points()
    if name in eps:
        conflict = _conflict(name)
        if conflict is not None:
            raise conflict
        return _load_entry_point(eps[name])
    known = sorted(set(_decorated) | set(eps))
    hint = _closest(name, known)
    raise UsageError(
        f"unknown pass '{name}'"
        + (f"; did you mean '{hint}'?" if hint else "")
        + " Run 'onnxslim passes' to list them"
        + ("" if known else " (none are registered: is onnxslim installed with pip install -e .?)")
    )


def available_passes() -> list[PassEntry]:
    """Every registered pass, loading each one; broken plugins are listed with their error."""
    entries: dict[str, PassEntry] = {}
    for name, ep in _entry_points().items():
        conflict = _conflict(name)
        if conflict is not None:
            entries[name] = PassEntry(name, ep.value, error=str(conflict))
            continue
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
