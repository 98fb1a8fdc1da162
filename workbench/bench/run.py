"""The ``bench`` command: one subcommand per benchmark, each in its own module.

Every benchmark module ``workbench.bench.<name>_cli`` defines ``add_parser(bench_subparsers)`` and
``run(args) -> dict``. The JSON it writes holds ``benchmark``, ``hardware`` (``device``,
``num_devices``...), ``model``, ``dtype``, ``workload`` and ``results`` (one object per system, with
``output_tok_s`` where throughput applies), as the project's contract asks (docs/ARCHITECTURE.md,
Contracts). Results we rely on are
committed under ``bench/results/`` (one file per benchmark, hardware and date).
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from workbench.errors import WorkbenchError

# where the committed results live (a checkout's bench/results/): notebooks and reports read them from here
RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"

# benchmark name -> module holding its ``add_parser`` and ``run``
BENCHMARKS = {
    "batching": "workbench.bench.batching_cli",
    "tp": "workbench.bench.parallel_cli",
    "pp": "workbench.bench.parallel_cli",
    "offload": "workbench.bench.offload_cli",
    "streaming": "workbench.bench.streaming_cli",
    "paged": "workbench.bench.paged_cli",
    "quant": "workbench.bench.quant_cli",
    "agree": "workbench.bench.agree_cli",
}


Run = TypeVar("Run")


def fastest_in_turns(candidates: dict[str, Callable[[], Run]], seconds: Callable[[Run], float],
                     repeats: int = 1, before_first: Callable[[str], None] | None = None,
                     ) -> dict[str, tuple[Run, list[float]]]:
    """Run every candidate ``repeats`` times, the candidates taking turns (a, b, ..., a, b, ...),
    and keep each one's fastest run, with the seconds of all its runs.

    On a shared machine (a CI runner, a cloud VM with hypervisor steal time) other work only
    ever adds time to a run, never takes it away: taking turns lets a slow spell fall on every
    candidate rather than on one, and the fastest run is the least disturbed. ``before_first(name)``
    runs before a candidate's first run (a warm-up: one-time costs out of the timing).
    """
    if repeats < 1:
        raise WorkbenchError(f"repeats must be >= 1, got {repeats}")
    best: dict[str, Run] = {}
    runs_s: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(repeats):
        for name, run in candidates.items():
            if round_ == 0 and before_first is not None:
                before_first(name)
            result = run()
            runs_s[name].append(seconds(result))
            if runs_s[name][-1] < min(runs_s[name][:-1], default=float("inf")):
                best[name] = result
    return {name: (best[name], runs_s[name]) for name in candidates}


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: ours beside the baselines")
    bench_sub = bench.add_subparsers(dest="bench_name", required=True, parser_class=type(bench))
    for module in BENCHMARKS.values():
        importlib.import_module(module).add_parser(bench_sub)


def run_bench(args: argparse.Namespace) -> dict:
    return importlib.import_module(BENCHMARKS[args.bench_name]).run(args)


def bench_device(args: argparse.Namespace):
    """The ``--device`` of a benchmark, after applying ``--threads`` (CPU threads for torch)."""
    import torch

    from workbench.hardware import resolve_device

    device = resolve_device(args.device)
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise WorkbenchError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return device


def write_report(report: dict, path: Path) -> None:
    """Write a benchmark's JSON; a path that cannot be written is a one-line error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    except OSError as err:
        raise WorkbenchError(f"cannot write {path}: {err}") from None
