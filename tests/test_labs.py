"""Classroom labs: plug-in points, checks, the student-notebook generator and the grader.

The generator and grader tests glob ``labs/solutions/``, so every lab is covered as soon as its
solution notebook exists: its student version must match the source (no drift), run to the end in
a fresh kernel and fail every check; a solution notebook must pass every check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from workbench import labs, plug
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.labs.build import (BEGIN, END, LABS_DIR, STUB, build, drift, read_lab, render,
                                  solution_paths, stub_source)
from workbench.labs.check import CHECK_MIME, Exercise
from workbench.labs.grade import grade, report, table

SOLUTIONS = solution_paths()


@plug.pluggable("tests.labs.double")
def double(x: int) -> int:
    return 2 * x


# ----------------------------------------------------------------------------- plug-in points


def test_override_routes_every_call_and_restores() -> None:
    assert double(3) == 6 and plug.library("tests.labs.double")(3) == 6
    with plug.override("tests.labs.double", lambda x: 10 * x):
        assert double(3) == 30
        with plug.override("tests.labs.double", lambda x: -x):  # nested: innermost wins
            assert double(3) == -3
        assert double(3) == 30  # the outer override is back
        assert plug.library("tests.labs.double")(3) == 6  # the library's own, untouched
    assert double(3) == 6
    with pytest.raises(RuntimeError), plug.override("tests.labs.double", lambda x: x):
        raise RuntimeError("a student's bug inside the block")
    assert double(3) == 6  # restored after an exception too


def test_plug_rejects_bad_use() -> None:
    with pytest.raises(WorkbenchError, match="unknown plug-in point"):
        plug.library("tests.labs.nope")
    with pytest.raises(WorkbenchError, match="unknown plug-in point"), plug.override("nope", abs):
        pass
    with pytest.raises(WorkbenchError, match="must be a function"), \
            plug.override("tests.labs.double", 3):
        pass
    with pytest.raises(WorkbenchError, match="registered twice"):
        plug.pluggable("tests.labs.double")(lambda x: x)


def test_every_plugged_exercise_names_a_real_plug_in_point() -> None:
    registry = labs.load_all()
    points = plug.points()
    for ex in registry.values():
        if ex.plug:
            assert ex.plug in points, ex.name
            assert ex.reference is points[ex.plug], f"{ex.name}: reference must be the library's own"


# ----------------------------------------------------------------------------- checks


def _toy(**overrides) -> Exercise:
    fields = dict(name="tests.toy", title="add one to each item", reference=lambda xs: [x + 1 for x in xs],
                  cases=lambda rng: {"xs": [rng.randint(-5, 5) for _ in range(rng.randint(0, 4))]},
                  edge_cases=({"xs": []}, {"xs": [7]}), trials=10,
                  hints=("first hint", "second hint"))
    return Exercise(**(fields | overrides))


def test_check_passes_the_reference_and_explains_a_failure(capsys) -> None:
    ex = _toy()
    ok = labs.check(ex, lambda xs: [x + 1 for x in xs], seed=3)
    assert ok and ok.cases == 12 and ok.message.startswith("PASS  tests.toy")
    assert "PASS  tests.toy" in capsys.readouterr().out  # printed outside a notebook

    wrong = labs.check(ex, lambda xs: [x + 1 for x in xs[:1]], seed=3, quiet=True)  # drops items
    assert not wrong and wrong.seed == 3
    assert "input:" in wrong.message and "expected:" in wrong.message and "got:" in wrong.message
    assert "hint: " in wrong.message

    raising = labs.check(ex, lambda xs: xs[0] + 1, seed=3, quiet=True)  # breaks on the empty list
    assert "edge case 1: raised IndexError" in raising.message and "input: xs=[]" in raising.message

    def stub(xs):
        raise NotImplementedError("write this function")

    todo = labs.check(ex, stub, quiet=True)
    assert not todo and todo.cases == 0 and "not implemented" in todo.message


def test_check_hints_advance_with_attempts() -> None:
    ex = _toy(name="tests.hints")
    shown = [labs.check(ex, lambda xs: xs, seed=0, quiet=True).message.split("hint: ")[1]
             for _ in range(3)]
    assert shown == ["first hint", "second hint", "first hint"]


def test_check_gives_each_call_its_own_copy_of_the_input() -> None:
    def sneaky(xs):  # mutates its input: the reference must not see the change
        xs.append(99)
        return [x + 1 for x in xs[:-1]]

    assert labs.check(_toy(name="tests.copies"), sneaky, seed=1, quiet=True)


def test_check_rejects_what_is_not_a_function() -> None:
    with pytest.raises(WorkbenchError, match="must be a function"):
        labs.check(_toy(name="tests.notfn"), 3)
    with pytest.raises(WorkbenchError, match="unknown exercise"):
        labs.check("tests.no.such.exercise", abs)


def test_try_in_engine_plugs_a_passing_function_only(capsys) -> None:
    from workbench.kv import blocks

    reference = plug.library("paged.slots")
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return reference(*args, **kwargs)

    def run():
        calls.clear()  # count only the calls the "engine" makes, not the check's
        return blocks.slot_mapping([3, 1], 2, 4, 4)

    assert labs.try_in_engine("paged.slots", spy, run) == [14, 15, 4, 5] and len(calls) == 1
    calls.clear()
    blocks.slot_mapping([3], 0, 1, 4)
    assert not calls  # the override is gone

    assert labs.try_in_engine("paged.slots", lambda *a: [], run) is None
    assert "skipped: paged.slots does not pass its check" in capsys.readouterr().out
    with pytest.raises(WorkbenchError, match="no plug-in point"):
        labs.try_in_engine("paged.gather", reference, run)


# ----------------------------------------------------------------------------- the generator


def test_stub_source_keeps_the_contract_and_indentation() -> None:
    source = "\n".join(['def f(x):', '    """Doc."""', f'    {BEGIN}', '    y = x + 1',
                        '    return y', f'    {END}', '', 'print(1)'])
    assert stub_source(source) == "\n".join(['def f(x):', '    """Doc."""', f'    {STUB}', '',
                                             'print(1)'])
    two = f"def f():\n    {BEGIN}\n    return 1\n    {END}\n\ndef g():\n  {BEGIN}\n  return 2\n  {END}"
    assert stub_source(two).count(STUB) == 2 and "return" not in stub_source(two)
    for bad, why in ((f"def f():\n    {BEGIN}\n    return 1", "never closed"),
                     (f"def f():\n    {END}", "without"),
                     ("def f():\n    return 1", "needs a"),
                     (f"{BEGIN}\n{BEGIN}\n{END}", "inside another block")):
        with pytest.raises(WorkbenchError, match=why):
            stub_source(bad, "x.ipynb, cell 3")


@pytest.mark.skipif(not SOLUTIONS, reason="no solution notebooks yet")
def test_generated_files_match_their_sources() -> None:
    """The committed student notebooks and answer key are exactly what the sources give."""
    assert drift() == [], "run 'python -m workbench labs build'"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_and_student_notebooks_are_consistent(solution: Path) -> None:
    lab = read_lab(solution)
    registry = labs.load_all()
    names = [e.name for e in lab.exercises]
    assert all(n in registry for n in names) and len(set(names)) == len(names)
    cells = lab.notebook.cells
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    assert 'device = "cpu"' in params.source and "seed = None" in params.source
    passed = {}  # the stored outputs of the CPU run: every check passed
    for cell in cells:
        for out in cell.get("outputs", []):
            result = out.get("data", {}).get(CHECK_MIME)
            if result:
                passed[result["exercise"]] = result["passed"]
            assert out.get("output_type") != "error", f"{solution.name}: stored error output"
    assert passed == {n: True for n in names}, f"{solution.name}: store the outputs of a passing run"

    student = nbformat.read(str(LABS_DIR / "student" / solution.name), as_version=4)
    assert student.metadata["workbench"]["exercises"] == names
    assert len(student.cells) == len(cells)
    for src, cell in zip(cells, student.cells):
        assert cell.metadata.get("tags", []) == src.metadata.get("tags", [])
        assert BEGIN not in cell.source and END not in cell.source
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        if "exercise" in cell.metadata.get("tags", []):
            assert STUB in cell.source and cell.source != src.source
        else:
            assert cell.source == src.source


@pytest.mark.skipif(not SOLUTIONS, reason="no solution notebooks yet")
def test_build_is_deterministic_and_check_finds_drift(tmp_path: Path, capsys) -> None:
    shutil.copytree(LABS_DIR / "solutions", tmp_path / "solutions")
    written = build(tmp_path)
    assert set(written) == set(render(tmp_path)) and (tmp_path / "answer_key.md").is_file()
    before = {p: p.read_bytes() for p in written}
    assert build(tmp_path) == [] and render(tmp_path) == render(tmp_path)  # nothing changes
    assert {p: p.read_bytes() for p in written} == before
    assert main(["labs", "build", "--check", "--labs-dir", str(tmp_path)]) == 0

    # a teacher edits a solution: its student notebook and the answer key drift
    first = solution_paths(tmp_path)[0]
    nb = nbformat.read(str(first), as_version=4)
    cell = next(c for c in nb.cells if "exercise" in c.metadata.get("tags", []))
    cell.source = cell.source.replace('"""', '"""Edited. ', 1)
    nbformat.write(nb, str(first))
    orphan = tmp_path / "student" / "lab99_gone.ipynb"  # a lab whose source was deleted
    orphan.write_text(before[tmp_path / "student" / first.name].decode())
    capsys.readouterr()
    assert main(["labs", "build", "--check", "--labs-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for name in (first.name, "answer_key.md", orphan.name):
        assert name in out
    assert drift(tmp_path) == sorted([tmp_path / "student" / first.name,
                                      tmp_path / "answer_key.md"]) + [orphan]
    assert main(["labs", "build", "--labs-dir", str(tmp_path)]) == 0
    assert drift(tmp_path) == [] and not orphan.exists()
    assert "Edited." in (tmp_path / "student" / first.name).read_text()


def test_build_reports_a_broken_source(tmp_path: Path, capsys) -> None:
    (tmp_path / "solutions").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("def f():\n    return 1", metadata={"tags": ["exercise"]})]
    nbformat.write(nb, str(tmp_path / "solutions" / "lab01_broken.ipynb"))
    assert main(["labs", "build", "--labs-dir", str(tmp_path)]) == 2
    assert "lab01_broken.ipynb, cell 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- grading


@pytest.mark.skipif(not SOLUTIONS, reason="no solution notebooks yet")
def test_student_notebooks_run_to_the_end_and_fail_every_check(tmp_path: Path) -> None:
    """Each generated student notebook, executed in a fresh kernel (two at a time): no cell raises,
    every exercise is checked and fails with the "not implemented" message."""
    books = []
    for path, text in render().items():  # what the sources give now (drift is tested above)
        if path.suffix == ".ipynb":
            books.append(tmp_path / path.name)
            books[-1].write_text(text)
    subs = grade(books, timeout=120, progress=False, jobs=2)
    for solution, sub in zip(SOLUTIONS, subs):
        assert sub.error is None and sub.cell_errors == [], (sub.label, sub.error, sub.cell_errors)
        assert sub.expected == [e.name for e in read_lab(solution).exercises], sub.label
        for name in sub.expected:
            assert sub.status(name) == "FAIL", (sub.label, name, sub.results.get(name))
            assert "not implemented" in sub.results[name]["message"], (sub.label, name)


@pytest.mark.skipif(not (LABS_DIR / "solutions" / "lab02_batching.ipynb").exists()
                    or not (LABS_DIR / "solutions" / "lab01_masking.ipynb").exists(),
                    reason="needs labs 01 and 02")
def test_grade_a_class(tmp_path: Path, capsys) -> None:
    """alice hands in the solution of lab 02; bob does one exercise of lab 01, deletes another
    and leaves a cell that raises: his other exercises are still graded."""
    (tmp_path / "alice").mkdir()
    (tmp_path / "bob").mkdir()
    shutil.copy(LABS_DIR / "solutions" / "lab02_batching.ipynb", tmp_path / "alice")
    solution = nbformat.read(str(LABS_DIR / "solutions" / "lab01_masking.ipynb"), as_version=4)
    bob = nbformat.read(str(LABS_DIR / "student" / "lab01_masking.ipynb"), as_version=4)
    exercises = [i for i, c in enumerate(bob.cells) if "exercise" in c.metadata.get("tags", [])]
    bob.cells[exercises[0]].source = solution.cells[exercises[0]].source  # causal: done
    bob.cells[exercises[0] + 1:exercises[0] + 1] = [nbformat.v4.new_code_cell("1 / 0")]
    del bob.cells[exercises[1] + 1]  # padded: the exercise cell deleted (never defined)
    nbformat.write(bob, str(tmp_path / "bob" / "lab01_masking.ipynb"))

    out_json = tmp_path / "grades.json"
    assert main(["labs", "grade", str(tmp_path), "--json", str(out_json), "--timeout", "120",
                 "--jobs", "2"]) == 0
    text = capsys.readouterr().out
    assert "alice/lab02_batching" in text and "bob/lab01_masking" in text
    grades = {s["label"]: s for s in json.loads(out_json.read_text())["submissions"]}
    alice, bob_grade = grades["alice/lab02_batching"], grades["bob/lab01_masking"]
    assert alice["passed"] == alice["total"] == 1 and alice["cell_errors"] == []
    assert {n: e["status"] for n, e in bob_grade["exercises"].items()} == {
        "masks.causal": "pass", "masks.padded": "missing", "masks.packed": "fail"}
    assert bob_grade["passed"] == 1 and bob_grade["total"] == 3
    assert any("ZeroDivisionError" in e for e in bob_grade["cell_errors"])


def test_labs_list_names_every_exercise(capsys) -> None:
    assert main(["labs", "list"]) == 0
    out = capsys.readouterr().out
    for lab in map(read_lab, SOLUTIONS):
        for ex in lab.exercises:
            line = next(l for l in out.splitlines() if l.startswith(ex.name + " "))
            assert lab.name in line and (labs.get(ex.name).plug or "-") in line


def test_grade_table_and_bad_input(tmp_path: Path) -> None:
    from workbench.labs.grade import Submission

    subs = [Submission(Path("a.ipynb"), "a", "lab01_masking", ["x.one", "x.two"],
                       results={"x.one": {"passed": True, "message": "PASS"}}),
            Submission(Path("b.ipynb"), "b", None, [], error="kernel died")]
    text = table(subs)
    assert "PASS" in text and "missing" in text and "1/2" in text and "kernel died" in text
    assert report(subs)["passed"] == 1 and report(subs)["total"] == 2
    with pytest.raises(WorkbenchError, match="no notebooks found"):
        grade([tmp_path], progress=False)
    with pytest.raises(WorkbenchError, match="not a notebook"):
        grade([tmp_path / "missing.txt"], progress=False)
    assert main(["labs", "grade", str(tmp_path), "--timeout", "0"]) == 2
