"""Helpers the notebooks share: the key-results summary each notebook ends with.

A notebook's last code cell, tagged ``summary``, calls :func:`summary` with its key results. The
figures are displayed as JSON, so ``python -m workbench notebooks run`` can read them back out of
the executed notebook and gather every notebook's results into one ``summary.json``/``summary.md``.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

SUMMARY_MIME = "application/json"


def _plain(value: Any) -> Any:
    """Make numpy/torch scalars and tuples JSON-friendly, rounding floats for reading."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Display ``results`` as the notebook's key results (JSON), and return them."""
    from IPython.display import display

    clean = _plain(results)
    display({SUMMARY_MIME: clean, "text/plain": json.dumps(clean, indent=1)}, raw=True)
    return clean


def displayed(cell: dict, mime: str) -> Iterator[Any]:
    """The payloads of type ``mime`` an executed notebook ``cell`` displayed, in order (a payload
    stored as a JSON string is parsed). Used to read summaries and lab check results back."""
    for output in cell.get("outputs", []):
        payload = output.get("data", {}).get(mime)
        if isinstance(payload, str):
            payload = json.loads(payload)
        if payload is not None:
            yield payload
