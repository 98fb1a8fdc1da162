"""``workbench notebooks run``: execute the ordered notebooks with papermill, gather key results.

Each ``notebooks/NN_topic.ipynb`` runs in order with the parameters ``device`` and ``smoke``
injected; the executed copies go to ``--out``, and the JSON that each notebook's ``summary``-tagged
cell displays (:func:`workbench.notebook.summary`) is gathered into ``summary.json`` and
``summary.md`` there.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.notebook import SUMMARY_MIME, displayed

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def ordered_notebooks(directory: Path = NOTEBOOK_DIR, only: str | None = None) -> list[Path]:
    """``NN_*.ipynb`` files in number order (GPU copies ``*.gpu.ipynb`` excluded)."""
    books = sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb") if ".gpu." not in p.name)
    if only:
        books = [p for p in books if only in p.name]
    if not books:
        raise WorkbenchError(f"no notebooks{f' matching {only!r}' if only else ''} in {directory}")
    return books


@functools.cache
def kernel_options() -> dict:
    """Options for papermill / nbclient: on POSIX the notebook kernels listen on IPC sockets in a
    private temporary folder rather than on TCP ports (nothing else on the machine can connect,
    and ipykernel >= 7 no longer warns, once per notebook, that its TCP traffic is unencrypted).
    One folder per process, removed at exit: processes that start kernels at once (lab grading)
    would race for the same socket names in a shared one; within a process kernels start one
    after the other."""
    if os.name != "posix":
        return {}
    from jupyter_client.manager import AsyncKernelManager

    sockets = tempfile.mkdtemp(prefix="workbench-kernels-")
    atexit.register(shutil.rmtree, sockets, ignore_errors=True)

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs) -> None:
            super().__init__(transport="ipc", ip=os.path.join(sockets, "kernel"), **kwargs)

    return {"kernel_manager_class": LocalKernelManager}


def read_summary(executed: Path) -> dict | None:
    """The JSON output of the cell tagged ``summary`` in an executed notebook, if any."""
    nb = json.loads(executed.read_text())
    for cell in nb.get("cells", []):
        if "summary" in cell.get("metadata", {}).get("tags", []):
            for payload in displayed(cell, SUMMARY_MIME):
                return payload
    return None


def run_notebooks(out: Path, device: str = "auto", smoke: bool = False,
                  only: str | None = None) -> dict:
    """Execute the notebooks into ``out``; return {notebook: {seconds, status, summary}}."""
    import papermill
    from tqdm.auto import tqdm

    from workbench.hardware import detect, resolve_device

    resolve_device(device)  # a bad device fails here, before any notebook starts
    books = ordered_notebooks(only=only)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"hardware": detect(device).stamp(), "smoke": smoke, "notebooks": {}}
    bar = tqdm(books, desc="notebooks", unit="nb")
    for book in bar:
        bar.set_postfix_str(book.name)
        target = out / book.name
        start = time.perf_counter()
        entry: dict = {}
        try:
            papermill.execute_notebook(str(book), str(target), cwd=str(book.parent),
                                       parameters={"device": device, "smoke": smoke},
                                       kernel_name="python3", progress_bar=False,
                                       **kernel_options())
            entry["status"] = "ok"
        except papermill.PapermillExecutionError as err:
            entry["status"] = f"failed in cell {err.exec_count}: {err.ename}: {err.evalue}"
        entry["seconds"] = round(time.perf_counter() - start, 1)
        entry["summary"] = read_summary(target) if target.exists() else None
        results["notebooks"][book.name] = entry
    (out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))
    print(f"executed notebooks and summary written to {out}/ (summary.md, summary.json)")
    failed = [name for name, e in results["notebooks"].items() if e["status"] != "ok"]
    if failed:
        raise WorkbenchError(f"notebooks failed: {', '.join(failed)} (see {out}/summary.md)")
    return results


def summary_markdown(results: dict) -> str:
    hw = results["hardware"]
    lines = [f"# Notebook results on {hw['device']} ({hw.get('device_type', '')})", "",
             f"smoke mode: {results['smoke']}", ""]
    for name, entry in results["notebooks"].items():
        lines += [f"## {name}", "", f"status: {entry['status']}, {entry['seconds']} s", ""]
        for key, value in (entry.get("summary") or {}).items():
            lines.append(f"- {key}: {value}")
        lines.append("")
    return "\n".join(lines)
