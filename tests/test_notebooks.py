"""Every ordered notebook executes end to end with papermill in smoke mode.

(pytest's nbval plugin separately re-runs the stored notebooks and compares the cells marked
``# NBVAL_CHECK_OUTPUT``; this test exercises the ``smoke`` parameter path the main job uses.)
"""

import pytest

from workbench.runner import NOTEBOOK_DIR, kernel_options, ordered_notebooks, read_summary


@pytest.mark.parametrize("book", ordered_notebooks(), ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(book, tmp_path):
    import papermill

    out = tmp_path / book.name
    papermill.execute_notebook(str(book), str(out), cwd=str(NOTEBOOK_DIR),
                               parameters={"device": "cpu", "smoke": True},
                               kernel_name="python3", progress_bar=False,
                               execution_timeout=600,  # a cell stuck (kernel messaging) fails, not hangs
                               **kernel_options())
    assert read_summary(out), f"{book.name} has no cell tagged 'summary' with JSON output"


def test_notebooks_have_parameters_and_summary_cells():
    import json

    for book in ordered_notebooks():
        cells = json.loads(book.read_text())["cells"]
        tags = [t for c in cells for t in c.get("metadata", {}).get("tags", [])]
        assert "parameters" in tags and "summary" in tags, book.name
        params = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
        source = "".join(params["source"])
        for knob in ('device = "auto"', 'model = "bundled"', "smoke = False"):
            assert knob in source, f"{book.name}: parameters cell lacks {knob}"



def test_papermill_reads_every_parameter():
    """papermill lists a notebook's parameters (``papermill --help-notebook``, the runner's
    checks) by parsing each assignment of the parameters cell; a line it cannot parse (an ``=``
    inside the comment does it) is dropped with a warning. Every assignment must parse."""
    import json
    import re
    from pathlib import Path

    from papermill.translators import PythonTranslator

    labs = sorted(Path(NOTEBOOK_DIR).parent.glob("labs/*/*.ipynb"))
    for book in [*ordered_notebooks(), *labs]:
        cells = json.loads(book.read_text())["cells"]
        params = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
        source = "".join(params["source"])
        assigned = re.findall(r"^(\w+)\s*(?::[^=]*)?=", source, flags=re.M)
        parsed = [p.name for p in PythonTranslator.inspect({"source": source})]
        assert parsed == assigned, f"{book.name}: papermill parsed {parsed}, the cell sets {assigned}"
