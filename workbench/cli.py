"""``python -m workbench`` (also installed as ``workbench``): info, generate, bench, notebooks, labs.

Bad input ends with one line on stderr (``workbench: error: ...``) and exit code 2, never a
traceback; ``--debug`` shows the traceback of unexpected failures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workbench.errors import WorkbenchError

DTYPES = ("float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, not a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise WorkbenchError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="An educational workbench for LLM inference.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="hardware, versions, measured bandwidth and peak")
    info.add_argument("--device", default="auto")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--quick", action="store_true", help="small, fast (inaccurate) measurements")

    gen = sub.add_parser("generate", help="generate completions for a JSONL file of prompts")
    gen.add_argument("--model", default="bundled",
                     help="'bundled', a checkpoint directory, or preset:NAME (random weights)")
    gen.add_argument("--prompts", required=True, type=Path,
                     help='JSONL: {"prompt": "..."} or {"prompt_ids": [...]}, '
                          'optional "max_new_tokens"')
    gen.add_argument("--output", required=True, help="JSONL written in the same order ('-' = stdout)")
    gen.add_argument("--strategy", default="static", choices=["static", "continuous"],
                     help="static padded batches, or continuous (iteration-level) batching")
    gen.add_argument("--kv", default="contiguous", choices=["contiguous", "paged"],
                     help="KV storage of the continuous engine: max-length slots, or paged blocks")
    gen.add_argument("--block-size", type=int, default=16, help="paged: tokens per KV block")
    gen.add_argument("--num-blocks", type=int, default=None,
                     help="paged: KV blocks in the pool (default: room for every sequence)")
    gen.add_argument("--prefix-caching", action="store_true",
                     help="paged: share full blocks of common prompt prefixes")
    gen.add_argument("--fast", action="store_true",
                     help="paged on a GPU: CUDA graphs, fused weights, torch.compile, Triton")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--batch-size", type=int, default=8,
                     help="static: rows per batch; continuous: max sequences running at once")
    gen.add_argument("--max-num-batched-tokens", type=int, default=1024,
                     help="continuous: tokens per forward pass (prefill chunks + decodes)")
    gen.add_argument("--chunked-prefill", action="store_true",
                     help="continuous: split long prompts over several steps")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="float32", choices=DTYPES)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-progress", action="store_true")
    gen.add_argument("--quant", default=None,
                     help="weight-only quantization: int8, int4, or int<4|8>-<gN|ch>-<sym|asym>")
    gen.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (torchrun or spawned)")
    gen.add_argument("--pp", type=int, default=1, help="pipeline parallel stages")
    gen.add_argument("--micro-batches", type=int, default=1,
                     help="pipeline: micro-batches per static forward pass (GPipe)")
    gen.add_argument("--timeout", type=float, default=300.0,
                     help="--tp/--pp: seconds a rank waits for its peers at one collective before "
                          "the job stops with an error (a dead or hung rank; default 300); the "
                          "job as a whole has no time limit")

    from workbench.bench.run import add_bench_parser

    add_bench_parser(sub)

    nb = sub.add_parser("notebooks", help="execute the ordered notebooks")
    nb_sub = nb.add_subparsers(dest="nb_command", required=True, parser_class=_Parser)
    run = nb_sub.add_parser("run", help="execute notebooks/NN_*.ipynb with papermill")
    run.add_argument("--out", type=Path, default=Path("out/notebooks"))
    run.add_argument("--device", default="auto")
    run.add_argument("--smoke", action="store_true", help="small sizes, for a quick check")
    run.add_argument("--only", default=None, help="run only notebooks whose name contains this")

    labs = sub.add_parser("labs", help="classroom labs: student notebooks, grading")
    labs_sub = labs.add_subparsers(dest="labs_command", required=True, parser_class=_Parser)
    build = labs_sub.add_parser("build", help="generate labs/student/ and labs/answer_key.md "
                                              "from labs/solutions/")
    build.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 listing the generated files that drifted")
    build.add_argument("--labs-dir", type=Path, default=None, help="default: the repository's labs/")
    grade = labs_sub.add_parser("grade", help="execute submitted lab notebooks and grade them")
    grade.add_argument("paths", nargs="+", help="notebooks, or folders searched for *.ipynb")
    grade.add_argument("--json", type=Path, default=None, help="also write the grades as JSON")
    grade.add_argument("--timeout", type=float, default=300.0,
                       help="seconds per cell before it is interrupted (default 300)")
    grade.add_argument("--jobs", type=int, default=1, help="notebooks graded at once (processes)")
    grade.add_argument("--labs-dir", type=Path, default=None, help="default: the repository's labs/")
    labs_sub.add_parser("list", help="every exercise with its lab and plug-in point")
    return parser


def cmd_info(args: argparse.Namespace) -> None:
    from workbench.hardware import detect, measure_roofline, resolve_device

    device = resolve_device(args.device)
    hw = detect(device)
    roof = measure_roofline(device, quick=args.quick)
    report = hw.to_dict() | {"stamp": hw.stamp(), "measured": {
        "bandwidth_GB_s": roof.bandwidth / 1e9, "peak_TFLOP_s": roof.peak_flops / 1e12,
        "ridge_point_flop_per_byte": roof.ridge_point}}
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return
    print(f"device:     {hw.device_name} ({device})")
    for key in ("cpu_name", "logical_cores", "total_ram_bytes", "gpus", "torch_version",
                "transformers_version", "python_version", "platform"):
        print(f"{key + ':':<22}{report.get(key)}")
    print(f"measured:   {roof}")


def cmd_generate(args: argparse.Namespace) -> None:
    from workbench.generate import generate_file

    generate_file(args)


def cmd_bench(args: argparse.Namespace) -> None:
    from workbench.bench.run import run_bench

    run_bench(args)


def cmd_notebooks(args: argparse.Namespace) -> None:
    from workbench.runner import run_notebooks

    run_notebooks(out=args.out, device=args.device, smoke=args.smoke, only=args.only)


def cmd_labs(args: argparse.Namespace) -> int:
    from workbench.labs.cli import run_labs

    return run_labs(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        commands = {"info": cmd_info, "generate": cmd_generate, "bench": cmd_bench,
                    "notebooks": cmd_notebooks, "labs": cmd_labs}
        code = commands[args.command](args)
    except WorkbenchError as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback with --debug
        if debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"workbench: unexpected error: {type(err).__name__}: {first} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return code or 0
