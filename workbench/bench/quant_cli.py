"""``bench quant``: weight and KV-cache quantization settings against the unquantized model.

For every weight setting (format x matmul kernel): weight bytes, greedy decode tok/s and the time
of one step's linear layers on the speed model (``--model``, e.g. ``preset:llama-3.2-1b``), and
held-out perplexity, max logit error and top-1 agreement on the quality model
(``--quality-model``, the bundled one by default). For every KV setting: cache bytes and
perplexity. The baseline (the model in ``--dtype``) runs first in the same process.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from workbench.bench.run import bench_device, write_report
from workbench.errors import WorkbenchError

DEFAULT_WEIGHTS = ("int8-ch-sym,int8-g64-sym,int4-ch-sym,int4-g128-sym,int4-g64-sym,int4-g64-asym,"
                   "int4-g32-asym")


def add_parser(bench_sub) -> None:
    b = bench_sub.add_parser("quant", help="int8/int4 weights and KV cache: memory, quality, speed")
    b.add_argument("--model", default="bundled", help="speed model (bundled, DIR or preset:NAME)")
    b.add_argument("--quality-model", default="bundled",
                   help="model for perplexity and logit error ('none' to skip)")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on GPUs, float32 on CPU")
    b.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="comma-separated weight formats, e.g. int8-ch-sym,int4-g64-asym")
    b.add_argument("--kernels", default="int8mm,int4mm",
                   help="fused kernels to try besides dequantize-then-matmul "
                        "(int8mm, int4mm, compiled; '' for none)")
    b.add_argument("--embeddings", default="int8-ch-sym,int4-g64-asym",
                   help="formats also run with the embedding table and LM head quantized")
    b.add_argument("--kv", default="int8-ch-sym,int4-g32-asym,int4-g32-sym",
                   help="KV-cache formats ('' for none)")
    b.add_argument("--kv-context", type=int, default=4096, help="tokens for the KV memory figure")
    b.add_argument("--batch-sizes", default="1", help="decode batch sizes, comma-separated")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--decode-steps", type=int, default=64)
    b.add_argument("--windows", type=int, default=32, help="held-out windows for perplexity")
    b.add_argument("--seq-len", type=int, default=256, help="tokens per held-out window")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--json", required=True, type=Path, help="where to write the results")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def kernels_for(config, kernels: list[str], device: torch.device, dtype: torch.dtype) -> list:
    """The fused kernels worth trying for ``config`` on this device and dtype."""
    from workbench.quant.kernels import KERNELS, TINYGEMM_GROUPS

    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise WorkbenchError(f"unknown kernels {unknown}: expected some of {KERNELS}")
    out = []
    for k in kernels:
        if k == "int8mm" and not (config.bits == 8 and config.symmetric
                                  and config.group_size is None):
            continue
        if k == "int4mm" and not (config.bits == 4 and config.group_size in TINYGEMM_GROUPS
                                  and (dtype == torch.bfloat16 or device.type == "cpu")):
            continue
        out.append(k)
    return out


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from workbench.hardware import detect, measure_bandwidth
    from workbench.quant.bench import QualityProbe, WeightSetting, measure_kv, measure_weights
    from workbench.quant.groupwise import parse_quant_config

    device = bench_device(args)
    dtype_name = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    try:
        batch_sizes = tuple(int(b) for b in _names(args.batch_sizes))
    except ValueError:
        raise WorkbenchError(f"--batch-sizes must be integers, got {args.batch_sizes!r}") from None
    if not batch_sizes or min(batch_sizes) < 1 or args.decode_steps < 1 or args.prompt_len < 1:
        raise WorkbenchError("--batch-sizes, --decode-steps and --prompt-len must be >= 1")
    weights = [parse_quant_config(n) for n in _names(args.weights)]
    with_embeddings = [parse_quant_config(n) for n in _names(args.embeddings)]
    kv_formats = [parse_quant_config(n) for n in _names(args.kv)]
    kernels = _names(args.kernels)

    settings = [WeightSetting()]
    for config in weights:
        settings += [WeightSetting(config)]
        settings += [WeightSetting(config, k) for k in kernels_for(config, kernels, device, dtype)]
    for config in with_embeddings:
        fused = kernels_for(config, kernels, device, dtype)
        settings.append(WeightSetting(config, fused[0] if fused else None, embeddings=True))

    probe = None
    if args.quality_model != "none":
        probe = QualityProbe(args.quality_model, device, dtype, args.windows, args.seq_len)
    bandwidth = measure_bandwidth(device)
    report = {"benchmark": "quant", "hardware": detect(device).stamp(), "model": args.model,
              "quality_model": args.quality_model, "dtype": dtype_name,
              "date": datetime.date.today().isoformat(),
              "workload": {"decode_batch_sizes": list(batch_sizes), "prompt_len": args.prompt_len,
                           "decode_steps": args.decode_steps, "greedy": True,
                           "quality_windows": args.windows, "quality_seq_len": args.seq_len,
                           "kv_context": args.kv_context},
              "bandwidth_GB_s": bandwidth / 1e9,
              "baseline_perplexity": None if probe is None else probe.baseline.perplexity,
              "results": []}
    jobs = [("weights", s) for s in settings] + [("kv", None)] + [("kv", q) for q in kv_formats]
    for kind, item in tqdm(jobs, desc="bench quant", unit="setting",
                           disable=getattr(args, "no_progress", False)):
        try:
            if kind == "weights":
                row = measure_weights(item, args.model, probe, device, dtype, bandwidth,
                                      batch_sizes, args.prompt_len, args.decode_steps)
            else:
                row = measure_kv(item, args.model, probe, device, dtype, args.kv_context)
        except (WorkbenchError, RuntimeError, NotImplementedError) as err:
            name = item.system if kind == "weights" else f"kv/{item.name if item else 'baseline'}"
            row = {"system": name, "kind": kind, "error": str(err).splitlines()[0][:300]}
        if row.get("system") == "baseline":
            row["system"] = dtype_name
        report["results"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_report(report, args.json)
    _print(report)
    return report


def _print(report: dict) -> None:
    for r in report["results"]:
        if "error" in r:
            print(f"{r['system']:<28} error: {r['error']}")
            continue
        ppl = (f"ppl {r['perplexity']:7.3f} ({100 * r['ppl_change']:+5.2f}%)" if "perplexity" in r
               else r.get("quality_error", ""))
        if r["kind"] == "weights":
            print(f"{r['system']:<28} {r['weight_bytes'] / 1e6:9.1f} MB"
                  f"  x{r['compression_vs_bf16']:4.2f}  {r['output_tok_s']:8.1f} tok/s  {ppl}")
        else:
            print(f"{r['system']:<28} {r['kv_bytes_per_token']:9.0f} B/token"
                  f"  x{r['compression_vs_bf16']:4.2f}  {ppl}")
