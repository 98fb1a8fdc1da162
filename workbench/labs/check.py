"""Exercises and their checks: the student's function against the library's on fresh random inputs.

An :class:`Exercise` names the library's own function (the reference), a builder of random inputs and
a few fixed edge cases. :func:`check` calls both functions on the same inputs (each gets its own deep
copy, so an in-place bug cannot hide) and prints one clear line: a pass with the number of cases, or
the first failing input, what was expected and what came back, with a hint. Each result is also shown
as a JSON bundle so that ``python -m workbench labs grade`` can read the results back out of an
executed notebook.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from typing import Any, Callable

import torch

from workbench.errors import WorkbenchError

CHECK_MIME = "application/vnd.workbench.check+json"

# A case builder takes a seeded random.Random and returns the keyword arguments of one call.
CaseBuilder = Callable[[random.Random], dict[str, Any]]
# A comparison returns None when ``got`` matches ``expected``, else one line saying how it differs.
Compare = Callable[[Any, Any], "str | None"]


def describe(value: Any, limit: int = 160) -> str:
    """A short, readable form of an input or output: small tensors in full, large ones by shape."""
    if isinstance(value, torch.Tensor):
        head = f"tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).replace('torch.', '')})"
        if value.numel() <= 64:
            body = str(value.tolist())
            return head + " " + (body if len(body) <= limit else body[:limit] + "...")
        return head
    if isinstance(value, dict):  # each value shortened on its own, so that every key shows
        return ", ".join(f"{k}={describe(v, limit // 2)}" for k, v in value.items())
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        inner = ", ".join(describe(v, limit // 2) for v in value)
        inner = f"[{inner}]"
    else:
        inner = repr(value)
    return inner if len(inner) <= limit else inner[:limit] + "..."


def compare_values(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """Default comparison: exact for integers, booleans and structure, ``allclose`` for floats."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.dtype != expected.dtype and not (got.is_floating_point() and expected.is_floating_point()):
            return f"dtype {got.dtype}, expected {expected.dtype}"
        if expected.is_floating_point():
            if not torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol):
                err = (got.float() - expected.float()).abs().max().item()
                return f"values differ (max abs error {err:.3g}, tolerance {atol:g} + {rtol:g}*|expected|)"
            return None
        if not torch.equal(got, expected):
            where = (got != expected).nonzero()[0].tolist()
            return f"values differ first at index {where}: got {got[tuple(where)].item()}, " \
                   f"expected {expected[tuple(where)].item()}"
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"expected a sequence of {len(expected)} items, got {describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            why = compare_values(g, e, atol, rtol)
            if why:
                return f"item {i}: {why}"
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"expected a dict with keys {sorted(expected)}, got {describe(got)}"
        for key in expected:
            why = compare_values(got[key], expected[key], atol, rtol)
            if why:
                return f"key {key!r}: {why}"
        return None
    if isinstance(expected, float):
        return None if abs(got - expected) <= atol + rtol * abs(expected) else f"{got!r}, expected {expected!r}"
    return None if got == expected else f"{describe(got)}, expected {describe(expected)}"


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One function a student writes, and how to check it against the library's own."""

    name: str                      # "paged.lookup": the registry key (and plug-in point, if any)
    title: str                     # one line shown in the check's output
    reference: Callable            # the library's function, the answer
    cases: CaseBuilder             # random inputs, as keyword arguments
    hints: tuple[str, ...] = ()    # shown one per failure, in order of attempts
    edge_cases: tuple[dict[str, Any], ...] = ()  # fixed inputs tried before the random ones
    trials: int = 25               # random cases per check
    compare: Compare = compare_values
    plug: str | None = None        # plug-in point (workbench.plug) the engine can run it at
    notebook: str = ""             # the technique notebook that teaches it

    def __post_init__(self):
        if not self.name or " " in self.name:
            raise WorkbenchError(f"exercise name must be one word like 'paged.lookup', got {self.name!r}")
        if self.trials < 1:
            raise WorkbenchError(f"exercise {self.name}: trials must be >= 1, got {self.trials}")


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What one check found: passed or not, the cases run, and the message shown."""

    exercise: str
    passed: bool
    cases: int
    message: str
    seed: int

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REGISTRY: dict[str, Exercise] = {}
_ATTEMPTS: dict[str, int] = {}


def register(exercise: Exercise) -> Exercise:
    """Add ``exercise`` to the registry (its name must be new)."""
    if exercise.name in REGISTRY:
        raise WorkbenchError(f"exercise {exercise.name!r} is registered twice")
    REGISTRY[exercise.name] = exercise
    return exercise


def get(name: str) -> Exercise:
    """The registered exercise called ``name`` (importing every lab's exercises first)."""
    from workbench.labs import load_all

    load_all()
    if name not in REGISTRY:
        raise WorkbenchError(f"unknown exercise {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def _run_cases(ex: Exercise, fn: Callable, seed: int, trials: int) -> tuple[int, str | None]:
    """Run the edge cases then ``trials`` random ones; return (cases passed, first failure or None)."""
    rng = random.Random(seed)
    all_cases = list(ex.edge_cases) + [ex.cases(rng) for _ in range(trials)]
    for i, case in enumerate(all_cases):
        kind = "edge case" if i < len(ex.edge_cases) else f"random case (seed {seed})"
        expected = ex.reference(**copy.deepcopy(case))
        try:
            got = fn(**copy.deepcopy(case))
        except NotImplementedError:
            raise
        except Exception as err:  # noqa: BLE001 - the student's bug, reported not raised
            return i, f"{kind} {i + 1}: raised {type(err).__name__}: {err}\n    input: {describe(case)}"
        why = ex.compare(got, expected)
        if why:
            return i, (f"{kind} {i + 1}: {why}\n    input:    {describe(case)}\n"
                       f"    expected: {describe(expected)}\n    got:      {describe(got)}")
    return len(all_cases), None


def check(exercise: str | Exercise, fn: Callable, *, seed: int | None = None,
          trials: int | None = None, quiet: bool = False) -> CheckResult:
    """Test ``fn`` against the exercise's reference; print a pass or a helpful failure and return it."""
    ex = get(exercise) if isinstance(exercise, str) else exercise
    if not callable(fn):
        raise WorkbenchError(f"check({ex.name!r}, fn): fn must be a function, got {type(fn).__name__}")
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    trials = ex.trials if trials is None else trials
    attempt = _ATTEMPTS[ex.name] = _ATTEMPTS.get(ex.name, 0) + 1
    try:
        n, failure = _run_cases(ex, fn, seed, trials)
    except NotImplementedError:
        n, failure = 0, "not implemented yet: replace the `raise NotImplementedError` with your code"
    total = len(ex.edge_cases) + trials
    if failure is None:
        message = f"PASS  {ex.name}: {ex.title} - {total} cases match the library"
    else:
        hint = f"\n    hint: {ex.hints[(attempt - 1) % len(ex.hints)]}" if ex.hints else ""
        message = f"FAIL  {ex.name}: {ex.title} - {failure}{hint}"
    result = CheckResult(ex.name, failure is None, n, message, seed)
    if not quiet:
        _show(result)
    return result


def _show(result: CheckResult) -> None:
    """Print the message; in a notebook also attach the result as JSON for the grader."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython ships with the notebooks' requirements
        print(result.message)
        return
    if get_ipython() is None:
        print(result.message)
        return
    payload = result.to_dict()
    if result.passed:  # the seed matters only to reproduce a failure; a pass then shows the same
        del payload["seed"]  # output at every run (nbval can check the cell)
    display({CHECK_MIME: payload, "text/plain": result.message}, raw=True)


def try_in_engine(exercise: str | Exercise, fn: Callable, run: Callable[[], Any]) -> Any:
    """Run ``run()`` with ``fn`` plugged into the engine in place of the library's function.

    The student's function must pass its check first (quietly); otherwise this prints why it did not
    run and returns None, so that a half-done lab notebook still executes to the end.
    """
    from workbench.plug import override

    ex = get(exercise) if isinstance(exercise, str) else exercise
    if ex.plug is None:
        raise WorkbenchError(f"exercise {ex.name!r} has no plug-in point in the engine")
    result = check(ex, fn, quiet=True)
    if not result.passed:
        print(f"skipped: {ex.name} does not pass its check yet, so the engine keeps its own function")
        return None
    with override(ex.plug, fn):
        return run()
