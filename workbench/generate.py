"""``workbench generate``: JSONL prompts in, JSONL completions out, every input checked first.

Input lines are ``{"prompt": "text"}`` or ``{"prompt_ids": [1, 2, 3]}`` with an optional
``"max_new_tokens"``. Output lines, in the same order, hold ``output_ids`` (generated tokens only,
the EOS that ended them included, as ``transformers.generate`` returns them), ``text`` (decoded
without special tokens; null when the checkpoint has no tokenizer), ``finish_reason`` and
``num_prompt_tokens``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.engine.requests import check_request
from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig


@dataclass(frozen=True)
class PromptLine:
    line: int  # 1-based line number in the input file
    prompt: str | None
    prompt_ids: list[int] | None
    max_new_tokens: int | None


def read_prompts(path: Path) -> list[PromptLine]:
    """Parse a JSONL prompt file; any malformed line raises WorkbenchError naming its number."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkbenchError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise WorkbenchError(f"cannot read prompts file {path}: {err}") from None
    prompts = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise WorkbenchError(f"{path}:{n}: malformed JSON ({err.msg})") from None
        prompts.append(_check_line(obj, path, n))
    if not prompts:
        raise WorkbenchError(f"{path} holds no prompts")
    return prompts


def _check_line(obj: object, path: Path, n: int) -> PromptLine:
    where = f"{path}:{n}"
    if not isinstance(obj, dict):
        raise WorkbenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt, ids, limit = obj.get("prompt"), obj.get("prompt_ids"), obj.get("max_new_tokens")
    if (prompt is None) == (ids is None):
        raise WorkbenchError(f"{where}: give exactly one of \"prompt\" or \"prompt_ids\"")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise WorkbenchError(f"{where}: \"prompt\" must be a non-empty string")
    if ids is not None and (not isinstance(ids, list) or not ids
                            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise WorkbenchError(f"{where}: \"prompt_ids\" must be a non-empty list of integers")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise WorkbenchError(f"{where}: \"max_new_tokens\" must be an integer >= 0, got {limit!r}")
    return PromptLine(n, prompt, ids, limit)


def tokenize(lines: list[PromptLine], tokenizer, config: ModelConfig, default_max_new: int,
             path: Path) -> tuple[list[list[int]], list[int]]:
    """Token ids and max_new_tokens per prompt, checked against the vocabulary and context."""
    all_ids, limits = [], []
    for p in lines:
        where = f"{path}:{p.line}"
        if p.prompt_ids is not None:
            ids = p.prompt_ids
        elif tokenizer is None:
            raise WorkbenchError(f"{where}: this checkpoint has no tokenizer.json; give "
                                 "\"prompt_ids\" instead of \"prompt\"")
        else:
            ids = tokenizer(p.prompt).input_ids
        limit = default_max_new if p.max_new_tokens is None else p.max_new_tokens
        check_request(config, ids, limit, where)
        all_ids.append(ids)
        limits.append(limit)
    return all_ids, limits


def generate_file(args: argparse.Namespace) -> None:
    """Run the ``generate`` command from parsed CLI arguments."""
    from workbench.engine import (EngineConfig, Request, SamplingParams, run_continuous,
                                  run_static)
    from workbench.hardware import resolve_device
    from workbench.model.loading import load_model, load_tokenizer

    if args.max_new_tokens < 0:
        raise WorkbenchError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise WorkbenchError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
    device = resolve_device(args.device)
    lines = read_prompts(args.prompts)
    for name in ("tp", "pp", "micro_batches"):
        if getattr(args, name, 1) < 1:
            raise WorkbenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    parallel = getattr(args, "tp", 1) * getattr(args, "pp", 1) > 1
    if not 0 < getattr(args, "timeout", 300.0) < math.inf:
        raise WorkbenchError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    paged_only = [f"--{n.replace('_', '-')}" for n in ("num_blocks", "prefix_caching", "fast")
                  if getattr(args, n, None)]
    if getattr(args, "kv", "contiguous") == "paged" or paged_only:
        if args.strategy != "continuous":
            raise WorkbenchError("paged KV storage is served by the continuous engine: use "
                                 "--strategy continuous")
        if args.kv != "paged":
            raise WorkbenchError(f"{', '.join(paged_only)} need(s) --kv paged")
        if parallel and args.fast:
            raise WorkbenchError("--fast (CUDA graphs) runs on one device: it cannot be combined "
                                 "with --tp/--pp")
    if parallel and getattr(args, "quant", None):
        raise WorkbenchError("--quant runs on one device: it cannot be combined with --tp/--pp")
    if parallel:  # each rank loads only its shard, in its own process
        from workbench.parallel.engine import config_of

        config = config_of(args.model)
    else:
        model = load_model(args.model, device, getattr(torch, args.dtype))
        config = model.config
        if getattr(args, "quant", None):  # weight-only int8/int4 (notebook 07)
            from workbench.quant.groupwise import parse_quant_config
            from workbench.quant.linear import quantize_model

            quantize_model(model, parse_quant_config(args.quant))
    tokenizer = load_tokenizer(args.model)
    ids, limits = tokenize(lines, tokenizer, config, args.max_new_tokens, args.prompts)
    requests = [Request(tuple(p), n, id=i) for i, (p, n) in enumerate(zip(ids, limits))]
    if parallel:
        run = _run_parallel(args, requests, sampling, device)
        if run is None:
            return  # not rank 0 of a torchrun job: rank 0 writes the output
    elif args.strategy == "continuous":
        config = EngineConfig(max_num_seqs=args.batch_size,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              chunked_prefill=args.chunked_prefill,
                              max_model_len=max(len(r.prompt_ids) + r.max_new_tokens
                                                for r in requests), **_paged(args))
        run = run_continuous(model, requests, config, sampling, progress=not args.no_progress)
    else:
        run = run_static(model, requests, args.batch_size, sampling,
                         progress=not args.no_progress)
    rejected = [t for t in run.traces if t.finish_reason == "rejected"]
    if rejected:  # e.g. a prompt longer than the continuous engine's per-step token budget
        raise WorkbenchError(rejected[0].error)
    records = []
    for line, prompt_ids, out in zip(lines, ids, run.outputs):
        text = None if tokenizer is None else tokenizer.decode(out.output_ids,
                                                               skip_special_tokens=True)
        record = {"output_ids": out.output_ids, "text": text, "finish_reason": out.finish_reason,
                  "num_prompt_tokens": len(prompt_ids)}
        if line.prompt is not None:
            record = {"prompt": line.prompt} | record
        records.append(json.dumps(record))
    body = "\n".join(records) + "\n"
    if args.output == "-":
        sys.stdout.write(body)
    else:
        try:
            Path(args.output).write_text(body)
        except OSError as err:
            raise WorkbenchError(f"cannot write {args.output}: {err}") from None


def _paged(args: argparse.Namespace) -> dict:
    """The continuous engine's paged-KV options from the command line ({} for ``--kv contiguous``)."""
    if getattr(args, "kv", "contiguous") != "paged":
        return {}
    return dict(kv="paged", block_size=args.block_size, num_blocks=args.num_blocks,
                prefix_caching=args.prefix_caching, cuda_graphs=args.fast, compile=args.fast)


def _run_parallel(args: argparse.Namespace, requests: list, sampling, device: torch.device):
    """``--tp/--pp``: under torchrun, this process is one rank; otherwise spawn them here."""
    from workbench.engine import EngineConfig
    from workbench.parallel import GenerateJob, ParallelConfig

    config = EngineConfig(max_num_seqs=args.batch_size,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          chunked_prefill=args.chunked_prefill, **_paged(args))
    job = GenerateJob(args.model, tuple(requests),
                      ParallelConfig(tp=args.tp, pp=args.pp, micro_batches=args.micro_batches),
                      args.strategy, args.batch_size, config, sampling, args.dtype,
                      progress=not getattr(args, "no_progress", False))
    from workbench.parallel.engine import run_cli_job

    return run_cli_job(job, device.type, getattr(args, "timeout", 300.0))
