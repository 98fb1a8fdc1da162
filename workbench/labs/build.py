"""Student notebooks and the answer key, generated from the solution notebooks.

The solution notebooks (``labs/solutions/labNN_topic.ipynb``) are the only source. In each code
cell tagged ``exercise`` the solution body sits between two marker lines::

    def my_lookup(block_table, start, num_tokens, block_size):
        \"\"\"The contract the student sees.\"\"\"
        # BEGIN SOLUTION
        ...
        # END SOLUTION

:func:`build` writes ``labs/student/labNN_topic.ipynb`` (the markers and everything between them
replaced by ``raise NotImplementedError(...)`` at the same indentation, outputs and execution
counts cleared, tags kept) and ``labs/answer_key.md`` (per lab and exercise: the solution, the
check, the hints). ``python -m workbench labs build --check`` regenerates everything in memory and
lists the files that differ, so that students' notebooks can never drift from their sources.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from workbench.errors import WorkbenchError

LABS_DIR = Path(__file__).resolve().parents[2] / "labs"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = 'raise NotImplementedError("write this function")'
EXERCISE_TAG = "exercise"
ANSWER_KEY = "answer_key.md"
# labs.check("paged.slots", my_slots ...): the exercise's name and the function checked
CHECK_CALL = re.compile(r"""\bcheck\(\s*["']([\w.]+)["']\s*,\s*([A-Za-z_]\w*)""")


def stub_source(source: str, where: str = "cell") -> str:
    """``source`` with each BEGIN/END SOLUTION block replaced by a NotImplementedError stub."""
    out: list[str] = []
    inside: str | None = None  # indentation of the open block's BEGIN line
    blocks = 0
    for number, line in enumerate(source.split("\n"), 1):
        text = line.strip()
        if text == BEGIN:
            if inside is not None:
                raise WorkbenchError(f"{where}, line {number}: '{BEGIN}' inside another block")
            inside = line[:len(line) - len(line.lstrip())]
            out.append(inside + STUB)
            blocks += 1
        elif text == END:
            if inside is None:
                raise WorkbenchError(f"{where}, line {number}: '{END}' without '{BEGIN}'")
            inside = None
        elif inside is None:
            out.append(line)
    if inside is not None:
        raise WorkbenchError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    if not blocks:
        raise WorkbenchError(f"{where}: an exercise cell needs a '{BEGIN}' ... '{END}' block")
    return "\n".join(out)


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


@dataclass(frozen=True)
class LabExercise:
    """One exercise of a lab notebook: the cell the student completes and the check that grades it."""

    name: str  # registry name, e.g. "paged.slots"
    function: str  # the name of the student's function, e.g. "my_slots"
    solution: str  # the whole exercise cell of the solution notebook
    check: str  # the code cell that calls labs.check on it


@dataclass(frozen=True)
class Lab:
    """A solution notebook, read and validated."""

    name: str  # file stem, e.g. "lab03_paged_kv"
    path: Path
    notebook: nbformat.NotebookNode
    title: str
    exercises: tuple[LabExercise, ...]


def read_lab(path: Path) -> Lab:
    """Read a solution notebook and pair each exercise cell with the check call after it."""
    nb = nbformat.read(str(path), as_version=4)
    title = next((c.source.split("\n")[0].lstrip("# ").strip() for c in nb.cells
                  if c.cell_type == "markdown" and c.source.startswith("#")), path.stem)
    exercises: list[LabExercise] = []
    pending: tuple[int, str] | None = None  # the exercise cell waiting for its check
    for i, cell in enumerate(nb.cells):
        where = f"{path.name}, cell {i}"
        if cell.cell_type != "code":
            continue
        if EXERCISE_TAG in _tags(cell):
            if pending is not None:
                raise WorkbenchError(f"{path.name}, cell {pending[0]}: exercise cell without a "
                                     "labs.check(...) cell before the next exercise")
            stub_source(cell.source, where)  # validates the markers
            pending = (i, cell.source)
            continue
        if BEGIN in cell.source:
            raise WorkbenchError(f"{where}: '{BEGIN}' in a cell not tagged '{EXERCISE_TAG}'")
        calls = CHECK_CALL.findall(cell.source)
        if calls and pending is not None:
            name, function = calls[0]
            exercises.append(LabExercise(name, function, pending[1], cell.source))
            pending = None
    if pending is not None:
        raise WorkbenchError(f"{path.name}, cell {pending[0]}: exercise cell without a "
                             "labs.check(...) cell after it")
    if not exercises:
        raise WorkbenchError(f"{path.name}: no cell tagged '{EXERCISE_TAG}'")
    return Lab(path.stem, path, nb, title, tuple(exercises))


def solution_paths(labs_dir: Path = LABS_DIR) -> list[Path]:
    """The solution notebooks, in lab order."""
    return sorted((labs_dir / "solutions").glob("lab*.ipynb"))


def read_labs(labs_dir: Path = LABS_DIR) -> list[Lab]:
    paths = solution_paths(labs_dir)
    if not paths:
        raise WorkbenchError(f"no solution notebooks (lab*.ipynb) in {labs_dir / 'solutions'}")
    return [read_lab(p) for p in paths]


def student_notebook(lab: Lab) -> str:
    """The student version of ``lab`` as notebook JSON: stubs, no outputs, tags kept."""
    nb = copy.deepcopy(lab.notebook)
    meta = {k: nb.metadata[k] for k in ("kernelspec", "language_info") if k in nb.metadata}
    meta["workbench"] = {"lab": lab.name, "exercises": [e.name for e in lab.exercises],
                         "generated_from": f"labs/solutions/{lab.path.name}"}
    nb.metadata = nbformat.from_dict(meta)
    for i, cell in enumerate(nb.cells):
        tags = _tags(cell)
        cell.metadata = nbformat.from_dict({"tags": tags} if tags else {})
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            if EXERCISE_TAG in tags:
                cell.source = stub_source(cell.source, f"{lab.path.name}, cell {i}")
    return nbformat.writes(nb) + "\n"


def _fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def answer_key(labs: list[Lab]) -> str:
    """The teacher's answer key (markdown): per lab and exercise, the solution, check and hints."""
    from workbench.labs.check import get

    lines = ["# Answer key: classroom labs", "",
             "Generated by `python -m workbench labs build` from `labs/solutions/`: do not edit "
             "this file, edit the solution notebooks and build again.", ""]
    for lab in labs:
        lines += [f"## {lab.name}: {lab.title}", "",
                  f"Student notebook: `labs/student/{lab.path.name}`; source: "
                  f"`labs/solutions/{lab.path.name}`.", ""]
        for ex in lab.exercises:
            reg = get(ex.name)
            ref = f"{reg.reference.__module__}.{reg.reference.__qualname__}"
            lines += [f"### `{ex.name}`: {reg.title}", "",
                      f"The student writes `{ex.function}`; the check compares it with the library's "
                      f"`{ref}` on {len(reg.edge_cases)} edge cases and {reg.trials} random cases."]
            if reg.plug:
                lines += [f"Plug-in point `{reg.plug}`: `try_in_engine` runs the engine with the "
                          "student's function once it passes."]
            if reg.notebook:
                lines += [f"Taught in `notebooks/{reg.notebook}.ipynb`."]
            lines += ["", "Solution:", "", _fence(ex.solution), "", "Check:", "", _fence(ex.check),
                      "", "Hints (the check shows one per failed attempt, in this order):", ""]
            lines += [f"{n}. {hint}" for n, hint in enumerate(reg.hints, 1)] + [""]
    return "\n".join(lines).rstrip() + "\n"


def render(labs_dir: Path = LABS_DIR) -> dict[Path, str]:
    """Every generated file (path -> content), computed from the solution notebooks."""
    labs = read_labs(labs_dir)
    files = {labs_dir / "student" / lab.path.name: student_notebook(lab) for lab in labs}
    files[labs_dir / ANSWER_KEY] = answer_key(labs)
    return files


def stale(labs_dir: Path, files: dict[Path, str]) -> list[Path]:
    """Student notebooks whose solution notebook no longer exists."""
    return sorted(p for p in (labs_dir / "student").glob("lab*.ipynb") if p not in files)


def drift(labs_dir: Path = LABS_DIR) -> list[Path]:
    """Generated files that are missing, differ from what the sources give, or have no source."""
    files = render(labs_dir)
    changed = [p for p, text in files.items()
               if not p.exists() or p.read_text(encoding="utf-8") != text]
    return sorted(changed) + stale(labs_dir, files)


def build(labs_dir: Path = LABS_DIR) -> list[Path]:
    """Write the student notebooks and the answer key; remove orphaned student notebooks.
    Returns the files written or removed (unchanged files are left alone)."""
    files = render(labs_dir)
    touched = []
    for path, text in files.items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            touched.append(path)
    for path in stale(labs_dir, files):
        path.unlink()
        touched.append(path)
    return touched
