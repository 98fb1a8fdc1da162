"""Grading submitted lab notebooks: execute each one, then check every exercise it should have.

``python -m workbench labs grade NOTEBOOK_OR_FOLDER... [--json OUT] [--timeout S]``

Each notebook runs top to bottom in a fresh kernel (nbclient) with ``allow_errors``: a student's
uncaught exception fails that cell, not the grading of the other exercises; a cell that runs past
the timeout is interrupted and execution goes on. Then the grader appends one cell per exercise of
the lab, calling :func:`workbench.labs.check` on the student's function with fresh random inputs,
so the grade does not depend on what the student did to the notebook's own check cells (the lab
is recognised by the notebook's metadata or its file name, and the exercises and function names
come from its solution notebook). For a notebook of an unknown lab the check results the notebook
itself displays are read instead (mime ``application/vnd.workbench.check+json``; the last one per
exercise). An exercise the notebook should contain but never checked counts as failed.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from workbench.errors import WorkbenchError
from workbench.labs.build import CHECK_CALL, LABS_DIR, read_lab, solution_paths
from workbench.labs.check import CHECK_MIME
from workbench.notebook import displayed

GRADER_TAG = "workbench-grader"
LAB_NAME = re.compile(r"lab\d\d_[a-z0-9_]+")


@dataclass
class Submission:
    """One graded notebook: what each expected exercise got, and what went wrong on the way."""

    path: Path
    label: str  # row name in the table: the path under the folder given, without .ipynb
    lab: str | None
    expected: list[str]
    results: dict[str, dict] = field(default_factory=dict)  # exercise -> check result
    cell_errors: list[str] = field(default_factory=list)  # "cell 7: ValueError: ..."
    error: str | None = None  # the notebook could not be read or the kernel died
    seconds: float = 0.0

    def status(self, name: str) -> str:
        if name not in self.expected:
            return "-"
        result = self.results.get(name)
        return "missing" if result is None else ("PASS" if result["passed"] else "FAIL")

    @property
    def passed(self) -> int:
        return sum(self.status(n) == "PASS" for n in self.expected)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "label": self.label, "lab": self.lab,
                "exercises": {n: {"status": self.status(n).lower(),
                                  "message": (self.results.get(n) or {}).get("message")}
                              for n in self.expected},
                "passed": self.passed, "total": len(self.expected),
                "score": self.passed / len(self.expected) if self.expected else 0.0,
                "cell_errors": self.cell_errors, "error": self.error,
                "seconds": round(self.seconds, 2)}


def find_notebooks(targets: list[str | Path]) -> list[tuple[Path, str]]:
    """(notebook, label) for each file given and each notebook under each folder given."""
    found: list[tuple[Path, str]] = []
    for target in map(Path, targets):
        if target.is_dir():
            books = sorted(p for p in target.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
            found += [(p, str(p.relative_to(target).with_suffix(""))) for p in books]
        elif target.suffix == ".ipynb" and target.is_file():
            found.append((target, target.stem))
        else:
            raise WorkbenchError(f"{target}: not a notebook (.ipynb) or a folder")
    if not found:
        raise WorkbenchError(f"no notebooks found in {', '.join(map(str, targets))}")
    return found


def _lab_of(nb: nbformat.NotebookNode, path: Path, solutions: dict[str, Path]) -> str | None:
    """The lab a submission belongs to: its metadata, else the lab name in its file name."""
    lab = nb.metadata.get("workbench", {}).get("lab")
    if lab in solutions:
        return lab
    match = LAB_NAME.search(path.stem)
    for candidate in (match.group(0),) if match else ():
        for name in solutions:  # "lab01_masking_alice" -> "lab01_masking"
            if candidate.startswith(name):
                return name
    return lab


def _grader_cell(name: str, function: str) -> nbformat.NotebookNode:
    code = (f"# appended by the grader\nimport workbench.labs as _grader_labs\n"
            f"if {function!r} in globals():\n"
            f"    _grader_labs.check({name!r}, globals()[{function!r}])\n"
            f"else:\n"
            f"    print('{function} is not defined: {name} not attempted')")
    return nbformat.v4.new_code_cell(code, metadata={"tags": [GRADER_TAG]})


def _kernel_env() -> dict[str, str]:
    """The environment of the grading kernel: this workbench importable even when not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: float) -> str | None:
    """Run every cell of ``nb`` in place (errors allowed); return why the run stopped early, if it did."""
    from nbclient import NotebookClient

    from workbench.runner import kernel_options

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            interrupt_on_timeout=True, record_timing=False, **kernel_options())
    try:
        client.execute(cwd=str(cwd), env=_kernel_env())
    except Exception as err:  # noqa: BLE001 - a dead kernel ends this notebook, not the grading
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def _check_results(cells: list) -> dict[str, dict]:
    """The last check result per exercise displayed by ``cells``."""
    results: dict[str, dict] = {}
    for cell in cells:
        for payload in displayed(cell, CHECK_MIME):
            if isinstance(payload, dict) and "exercise" in payload:
                results[payload["exercise"]] = payload
    return results


def _cell_errors(nb: nbformat.NotebookNode) -> list[str]:
    errors = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                why = ("interrupted (ran past the timeout)" if out.get("ename") == "KeyboardInterrupt"
                       else f"{out.get('ename')}: {str(out.get('evalue'))[:200]}")
                errors.append(f"cell {i}: {why}")
    return errors


def grade_notebook(path: Path, label: str, timeout: float = 300.0,
                   labs_dir: Path = LABS_DIR) -> Submission:
    """Execute one submission and check each exercise of its lab."""
    solutions = {p.stem: p for p in solution_paths(labs_dir)}
    start = time.perf_counter()
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as err:  # noqa: BLE001 - an unreadable file is that student's zero
        sub = Submission(path, label, None, [])
        sub.error = f"cannot read the notebook: {type(err).__name__}: {err}"
        return sub
    lab = _lab_of(nb, path, solutions)
    if lab in solutions:  # the lab's own exercises, checked by the grader's cells
        exercises = read_lab(solutions[lab]).exercises
        expected = [e.name for e in exercises]
        nb.cells += [_grader_cell(e.name, e.function) for e in exercises]
    else:  # unknown lab: trust the check calls the notebook makes
        expected = list(nb.metadata.get("workbench", {}).get("exercises", []))
        for cell in nb.cells:
            if cell.cell_type == "code":
                expected += [n for n, _ in CHECK_CALL.findall(cell.source) if n not in expected]
    sub = Submission(path, label, lab, expected)
    sub.error = execute(nb, path.resolve().parent, timeout)
    graded = [c for c in nb.cells if GRADER_TAG in c.get("metadata", {}).get("tags", [])]
    sub.results = _check_results(graded if lab in solutions else nb.cells)
    sub.cell_errors = _cell_errors(nb)
    sub.seconds = time.perf_counter() - start
    return sub


def grade(targets: list[str | Path], timeout: float = 300.0, labs_dir: Path = LABS_DIR,
          progress: bool = True, jobs: int = 1) -> list[Submission]:
    """Grade every notebook in ``targets`` (files or folders), one fresh kernel each, ``jobs``
    notebooks at a time (each in its own process); results in the order found."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    if jobs < 1:
        raise WorkbenchError(f"jobs must be >= 1, got {jobs}")
    books = find_notebooks(targets)
    bar = tqdm(total=len(books), desc="grading", unit="notebook", disable=not progress)
    if jobs == 1:
        subs = []
        for path, label in books:
            subs.append(grade_notebook(path, label, timeout, labs_dir))
            bar.update()
    else:
        spawn = multiprocessing.get_context("spawn")  # fresh workers: no forked threads
        with ProcessPoolExecutor(min(jobs, len(books)), mp_context=spawn) as pool:
            futures = [pool.submit(grade_notebook, path, label, timeout, labs_dir)
                       for path, label in books]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            subs = [f.result() for f in futures]
    bar.close()
    return subs


def table(subs: list[Submission]) -> str:
    """Submissions x exercises (PASS / FAIL / missing; '-' where a lab has no such exercise)."""
    columns: list[str] = []
    for sub in subs:
        columns += [n for n in sub.expected if n not in columns]
    header = ["submission"] + columns + ["score"]
    rows = [[s.label] + [s.status(n) for n in columns] + [f"{s.passed}/{len(s.expected)}"]
            for s in subs]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for s in subs:
        if s.error:
            notes.append(f"{s.label}: stopped early: {s.error}")
        if s.cell_errors:
            notes.append(f"{s.label}: {len(s.cell_errors)} cell(s) raised: {s.cell_errors[0]}")
        if not s.expected:
            notes.append(f"{s.label}: no exercise found (not a lab notebook?)")
    total = sum(s.passed for s in subs), sum(len(s.expected) for s in subs)
    lines += ["", f"{len(subs)} notebook(s), {total[0]}/{total[1]} exercises passed"] + notes
    return "\n".join(lines)


def report(subs: list[Submission]) -> dict:
    """The grading as JSON: one object per submission (see :meth:`Submission.to_dict`)."""
    return {"submissions": [s.to_dict() for s in subs],
            "passed": sum(s.passed for s in subs),
            "total": sum(len(s.expected) for s in subs)}
