"""Plug-in points: named library functions that a lab can swap for the student's own.

A library function decorated with ``@pluggable("paged.lookup")`` behaves exactly as before until a
caller installs a replacement with ``with override("paged.lookup", my_fn): ...``; inside the block
every call (from the engine, the scheduler, anywhere) goes to ``my_fn``. That is how a classroom lab
runs the real engine with a student's mask builder, admission step or quantizer in place of ours
(``workbench/labs``). The cost outside a lab is one dictionary lookup per call.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

from workbench.errors import WorkbenchError

_DEFAULTS: dict[str, Callable] = {}
_OVERRIDES: dict[str, Callable] = {}


def pluggable(name: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` under ``name`` and route its calls through any installed override."""

    def wrap(fn: Callable) -> Callable:
        if name in _DEFAULTS:
            raise WorkbenchError(f"plug-in point {name!r} is registered twice")
        _DEFAULTS[name] = fn

        @functools.wraps(fn)
        def dispatch(*args, **kwargs):
            impl = _OVERRIDES.get(name)
            return (impl or fn)(*args, **kwargs)

        dispatch.plug_name = name  # type: ignore[attr-defined]
        dispatch.library_impl = fn  # type: ignore[attr-defined]
        return dispatch

    return wrap


def points() -> dict[str, Callable]:
    """Every plug-in point and the library function behind it."""
    return dict(_DEFAULTS)


def library(name: str) -> Callable:
    """The library's own function for plug-in point ``name``."""
    if name not in _DEFAULTS:
        known = ", ".join(sorted(_DEFAULTS)) or "none registered yet"
        raise WorkbenchError(f"unknown plug-in point {name!r} (known: {known})")
    return _DEFAULTS[name]


def active() -> dict[str, Callable]:
    """The overrides installed right now, by plug-in point (what spawned ranks must install too)."""
    return dict(_OVERRIDES)


@contextlib.contextmanager
def override(name: str, fn: Callable) -> Iterator[None]:
    """Route every call of plug-in point ``name`` to ``fn`` inside the ``with`` block."""
    library(name)  # raises for an unknown name
    if not callable(fn):
        raise WorkbenchError(f"override for {name!r} must be a function, got {type(fn).__name__}")
    previous = _OVERRIDES.get(name)
    _OVERRIDES[name] = fn
    try:
        yield
    finally:
        if previous is None:
            _OVERRIDES.pop(name, None)
        else:
            _OVERRIDES[name] = previous
