"""Plug-in overrides that travel to spawned ranks.

A lab runs the engine with a student's function in place of the library's
(:func:`workbench.plug.override`). Ranks started by :func:`workbench.parallel.launch.launch` are new
processes: they inherit no ``with`` block, and they cannot import a function defined in a notebook
cell. So ``launch`` packs every override active in the parent (:func:`pack_active`): a function of
an importable module travels by reference (pickle); one defined in a notebook or a script
(``__main__``) travels as its source code, with the modules, functions and plain values it names.
Each rank rebuilds the functions and installs them around its work (:func:`installed`). Notebook
``labs/solutions/lab04_tensor_parallel.ipynb`` runs a TP=2 generation this way.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import inspect
import linecache
import pickle
import sys
import textwrap
import types
from collections.abc import Callable, Iterator

from workbench.errors import WorkbenchError
from workbench.plug import active, library, override, points

__all__ = ["installed", "pack", "pack_active", "unpack"]

Packed = tuple  # ("ref", fn), ("library", point, module) or ("source", name, source, env)


def _importable(fn: Callable) -> bool:
    """True when ``fn`` is ``module.qualname`` of a module that another process can import."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or module.__name__ == "__main__" or not getattr(module, "__file__", None):
        return False
    target = module
    for part in getattr(fn, "__qualname__", "").split("."):
        target = getattr(target, part, None)
    return target is fn


def _global_names(code: types.CodeType) -> set[str]:
    """Global names a function's code (and the code nested in it, e.g. comprehensions) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def pack(fn: Callable) -> Packed:
    """A picklable form of ``fn``; :func:`unpack` makes it a function again in another process."""
    if _importable(fn):
        return ("ref", fn)
    point = next((p for p, impl in points().items() if impl is fn), None)
    if point is not None:  # a library function behind its plug-in wrapper (a lab's reference)
        return ("library", point, fn.__module__)
    name = getattr(fn, "__name__", type(fn).__name__)
    if not isinstance(fn, types.FunctionType) or name == "<lambda>":
        raise WorkbenchError(f"cannot send {name} to the ranks: define it with `def` (a "
                             "module-level function or a notebook cell), not as a lambda or a "
                             "callable object")
    if fn.__closure__:
        raise WorkbenchError(f"cannot send {name} to the ranks: it is defined inside another "
                             "function; define it at the top level of a cell")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise WorkbenchError(f"cannot send {name} to the ranks: its source code is not available "
                             "(define it in a notebook cell or a file)") from None
    env: dict[str, tuple] = {}
    for ref in sorted(_global_names(fn.__code__)):
        if ref not in fn.__globals__ or ref == name:
            continue  # a builtin, an undefined name (fails there as here), or itself
        value = fn.__globals__[ref]
        if isinstance(value, types.ModuleType):
            env[ref] = ("module", value.__name__)
        elif callable(value) and not _importable(value) and isinstance(value, types.FunctionType):
            env[ref] = ("function", pack(value))
        else:
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - any pickling failure means the same thing here
                raise WorkbenchError(f"cannot send {name} to the ranks: it uses {ref!r} "
                                     f"({type(value).__name__}), which cannot be pickled; pass it "
                                     "as an argument or define it inside the function") from None
            env[ref] = ("value", value)
    return ("source", name, source, env)


def unpack(packed: Packed) -> Callable:
    """The function :func:`pack` packed, rebuilt in this process."""
    if packed[0] == "ref":
        return packed[1]
    if packed[0] == "library":
        importlib.import_module(packed[2])
        return library(packed[1])
    _, name, source, env = packed
    filename = f"<plug-in {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks
    namespace: dict = {"__name__": "__plugin__", "__builtins__": builtins}
    for ref, (kind, value) in env.items():
        namespace[ref] = (importlib.import_module(value) if kind == "module"
                          else unpack(value) if kind == "function" else value)
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the parent's own function
    return namespace[name]


def pack_active() -> list[tuple[str, str, Packed]]:
    """Every override installed in this process: (plug-in point, its module, packed function)."""
    return [(name, library(name).__module__, pack(fn)) for name, fn in active().items()]


@contextlib.contextmanager
def installed(packed: list[tuple[str, str, Packed]]) -> Iterator[None]:
    """Install the overrides :func:`pack_active` packed in another process, for the block."""
    with contextlib.ExitStack() as stack:
        for name, module, fn in packed:
            importlib.import_module(module)  # registers the plug-in point
            stack.enter_context(override(name, unpack(fn)))
        yield
