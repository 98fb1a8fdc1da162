"""Classroom labs: exercises with checks, plug-in points, and generated student notebooks.

A lab notebook (``labs/solutions/``) asks the student to write the key function of a technique; a
check (:func:`check`) compares it with the library's own on fresh random inputs, and
:func:`try_in_engine` runs the real engine with it plugged in (``workbench.plug``). The solution
notebooks are the source: ``python -m workbench labs build`` writes the student versions and the
teacher's answer key from them. Exercises live in one module per technique (``ex_*.py``).
"""

from __future__ import annotations

import importlib

from workbench.labs.check import (REGISTRY, CheckResult, Exercise, check, compare_values, describe,
                                  get, register, try_in_engine)

# One module per technique; each registers its exercises on import.
EXERCISE_MODULES: tuple[str, ...] = (
    "workbench.labs.ex_masking",
    "workbench.labs.ex_batching",
    "workbench.labs.ex_paged",
    "workbench.labs.ex_sinks",
    "workbench.labs.ex_parallel",
    "workbench.labs.ex_pipeline",
    "workbench.labs.ex_offload",
    "workbench.labs.ex_quant",
)


def load_all() -> dict[str, Exercise]:
    """Import every exercise module, so the registry is complete; return it."""
    for module in EXERCISE_MODULES:
        importlib.import_module(module)
    return REGISTRY


__all__ = ["CheckResult", "Exercise", "REGISTRY", "check", "compare_values", "describe", "get",
           "load_all", "register", "try_in_engine"]
