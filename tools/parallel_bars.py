"""Issue 5's bars judged from benchmark files (``workbench.parallel.bars`` says how each is read).

    python tools/parallel_bars.py FILE.json... [--json OUT.json]

FILEs are what ``bench tp``, ``bench pp`` and ``bench agree`` wrote (others are ignored). Prints one
line per bar - its value, target, met / NO / not measured - and the files with their hardware.
"""

import argparse
import json
from pathlib import Path

from workbench.parallel.bars import bars_table, judge

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("files", nargs="+", type=Path)
parser.add_argument("--json", type=Path, default=None, help="also write the verdicts as JSON")
args = parser.parse_args()

reports = {}
for path in args.files:
    if not path.is_file():
        parser.error(f"no such file: {path}")
    reports[path.name] = json.loads(path.read_text())
bars = judge(reports)
print(bars_table(bars))
if args.json:
    args.json.write_text(json.dumps([b.to_dict() for b in bars], indent=1) + "\n")
