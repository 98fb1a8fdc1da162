"""``python -m workbench labs build | grade | list`` (the parser is in :mod:`workbench.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workbench.errors import WorkbenchError


def _labs_dir(args: argparse.Namespace) -> Path:
    from workbench.labs.build import LABS_DIR

    path = args.labs_dir or LABS_DIR
    if not (path / "solutions").is_dir():
        raise WorkbenchError(f"{path}: no solutions/ folder (expected labs/solutions/*.ipynb)")
    return path


def cmd_build(args: argparse.Namespace) -> int:
    from workbench.labs.build import build, drift

    labs_dir = _labs_dir(args)
    if args.check:
        drifted = drift(labs_dir)
        for path in drifted:
            print(f"drifted: {path}")
        if drifted:
            print(f"{len(drifted)} generated file(s) differ from labs/solutions/: "
                  "run 'python -m workbench labs build'")
            return 1
        print("labs/student/ and labs/answer_key.md match labs/solutions/")
        return 0
    touched = build(labs_dir)
    for path in touched:
        print(f"{'wrote' if path.exists() else 'removed'}: {path}")
    print(f"{len(touched)} file(s) changed" if touched else "already up to date")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    from workbench.labs.grade import grade, report, table

    if args.timeout <= 0:
        raise WorkbenchError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    subs = grade(args.paths, timeout=args.timeout, labs_dir=_labs_dir(args), jobs=args.jobs)
    print(table(subs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report(subs), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from workbench.labs import load_all
    from workbench.labs.build import LABS_DIR, read_labs

    registry = load_all()
    # in lab order, each lab's exercises in notebook order; exercises no lab uses last
    lab_of = {e.name: lab.name for lab in read_labs(LABS_DIR) for e in lab.exercises}
    rows = [("exercise", "lab", "plug-in point", "reference", "title")]
    for name in list(lab_of) + sorted(set(registry) - set(lab_of)):
        ex = registry.get(name)
        if ex is None:
            rows.append((name, lab_of[name], "-", "-", "NOT REGISTERED: add it to an ex_*.py module"))
            continue
        rows.append((name, lab_of.get(name, "-"), ex.plug or "-",
                     f"{ex.reference.__module__}.{ex.reference.__qualname__}", ex.title))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    return 0


def run_labs(args: argparse.Namespace) -> int:
    commands = {"build": cmd_build, "grade": cmd_grade, "list": cmd_list}
    return commands[args.labs_command](args)
