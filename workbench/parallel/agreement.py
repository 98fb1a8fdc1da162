"""How far a TP / PP grid's bf16 logits are from one device's, against bf16's own error.

In fp32 every grid gives one device's greedy tokens exactly (``tests/test_parallel_generate.py``).
In bf16 they need not: a split changes the order of the sums (a row-parallel product adds
``tp`` partial products in the all-reduce instead of inside one GEMM, a pipeline hands bf16
activations over), and bf16 keeps 8 bits of mantissa, so each order rounds differently. What a
split must not do is add more error than bf16 itself does. The check, on one set of sequences:

* ``exact``: the plain model (:class:`~workbench.model.llama.LlamaModel`, no parallel code) in
  fp32; ``one``: the same model in the low dtype; ``grid``: the TP x PP ranks in the low dtype.
  Every one scores the same token sequences teacher-forced in one forward pass (prompt + the exact
  model's greedy continuation), so every position is compared on the same context.
* ``bf16_error = max |one - exact|`` over every logit: bf16's own error on one device.
* The tolerance is ``2 x bf16_error``, from the triangle inequality: if the grid is as accurate as
  one device (``|grid - exact| <= bf16_error``), then ``|grid - one| <= |grid - exact| + |exact -
  one| <= 2 x bf16_error``. A grid passes when ``max |grid - one|`` stays within it.
* Reported with it: ``max |grid - exact|`` (the grid's own bf16 error), and the top-1 agreement of
  grid and one device position by position (a token can flip only where one device's top-2 margin is
  below ``2 x max |grid - one|``: a near-tie).

:func:`check_agreement` runs it (one job of ranks per world size; gloo on CPU, NCCL on GPUs);
``bench agree`` writes it as JSON, notebooks 04 and 05 show it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.model.batch import ForwardBatch
from workbench.parallel.plan import ParallelConfig

__all__ = ["AgreementCheck", "check_agreement", "compare", "score_worker", "sequences"]

TEXTS = ("def fibonacci(n):", "import os", "class Stack:", "for i in range(10):",
         "with open(path) as f:", "return sorted(items)", "if __name__ == '__main__':",
         "raise ValueError(")


@dataclass(frozen=True)
class AgreementCheck:
    """Which checkpoint, grids and sequences (every rank gets the same description)."""

    model: str  # a checkpoint directory or "bundled" (a preset's random shards differ per rank)
    grids: tuple[ParallelConfig, ...]
    dtype: str = "bfloat16"
    rows: int = 4  # sequences scored
    prompt_len: int = 4  # tokens of each prompt (texts cut to the shortest, or random ids)
    new_tokens: int = 28  # greedy tokens of the exact model appended to each prompt

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16"):  # fp32: the tokens are equal (the tests)
            raise WorkbenchError(f"dtype must be bfloat16 or float16, got {self.dtype!r}")
        if min(self.rows, self.prompt_len, self.new_tokens + 1) < 1:
            raise WorkbenchError("rows and prompt_len must be >= 1, new_tokens >= 0")
        if not self.grids:
            raise WorkbenchError("give at least one grid")


def sequences(check: AgreementCheck, model) -> torch.Tensor:
    """``[rows, prompt_len + new_tokens]`` token ids: prompts (the checkpoint's tokenizer on
    :data:`TEXTS`, else random ids) and the fp32 ``model``'s greedy continuation of each (the
    static engine, every row exactly ``new_tokens`` long)."""
    from workbench.engine import Request, run_static
    from workbench.model.loading import load_tokenizer

    tok = load_tokenizer(check.model)
    vocab = model.config.vocab_size
    if tok is not None:
        ids = [tok(TEXTS[i % len(TEXTS)]).input_ids for i in range(check.rows)]
        width = min(check.prompt_len, *(len(t) for t in ids))
        prompts = torch.tensor([t[:width] for t in ids])
    else:
        g = torch.Generator().manual_seed(vocab)
        prompts = torch.randint(1, vocab, (check.rows, check.prompt_len), generator=g)
    requests = [Request(tuple(p), check.new_tokens, ignore_eos=True, id=i)
                for i, p in enumerate(prompts.tolist())]
    run = run_static(model, requests, batch_size=check.rows)
    return torch.tensor([list(r.prompt_ids) + list(t.output_ids)
                         for r, t in zip(requests, run.traces)])  # [rows, P + new_tokens]


def score_worker(ctx, check: AgreementCheck, ids: torch.Tensor) -> list[torch.Tensor] | None:
    """Every grid of ``check`` scores ``ids`` teacher-forced in one forward pass; rank 0 returns
    each grid's logits ``[rows, T, V]`` (fp32, CPU), the other ranks None."""
    from workbench.parallel.engine import RankWorker

    out = []
    for par in check.grids:
        worker = RankWorker.load(ctx, check.model, par, getattr(torch, check.dtype))
        if worker is None:
            raise WorkbenchError(f"{par} leaves rank {ctx.rank} idle: run one job per world size")
        with torch.inference_mode():
            logits = worker.execute(ForwardBatch.prefill(ids.to(ctx.device)), None, False)
        if ctx.rank == 0:
            out.append(logits.float().cpu())
        del worker
    return out if ctx.rank == 0 else None


def compare(grid: torch.Tensor, one: torch.Tensor, exact: torch.Tensor) -> dict:
    """One grid's row of the report: its logits against one device's (same dtype) and the exact
    fp32 ones, all ``[rows, T, V]`` fp32."""
    bf16_error = (one - exact).abs().max().item()
    diff = (grid - one).abs().max().item()
    top2 = one.topk(2, dim=-1).values  # [rows, T, 2]
    flips = grid.argmax(-1) != one.argmax(-1)  # [rows, T]
    margins = (top2[..., 0] - top2[..., 1])[flips]
    return {"max_abs_diff_vs_one_device": diff,
            "max_abs_diff_vs_fp32": (grid - exact).abs().max().item(),
            "one_device_max_abs_diff_vs_fp32": bf16_error,
            "tolerance": 2 * bf16_error, "within_tolerance": diff <= 2 * bf16_error,
            "top1_agreement": 1.0 - flips.float().mean().item(), "positions": flips.numel(),
            "flips": int(flips.sum()),
            "largest_flipped_margin": margins.max().item() if len(margins) else 0.0,
            "logit_std": one.std().item()}


def check_agreement(check: AgreementCheck, device: str = "cpu", timeout_s: float = 300.0,
                    threads: int = 1, backend: str = "auto") -> dict:
    """Score the sequences on one device (fp32 and ``check.dtype``) here, then on every grid
    (one job of ranks per world size); returns ``{"sequences": [rows, T], "rows": [...]}``, one
    row per grid in grid order (:func:`compare` plus ``grid``). ``backend``: :func:`launch`'s
    (``"gloo"`` on GPUs lets the ranks share one GPU: TP grids only, its GPU collectives being
    all-reduce and broadcast)."""
    from workbench.hardware import resolve_device
    from workbench.model.loading import PRESET_PREFIX, load_model
    from workbench.parallel.engine import config_of
    from workbench.parallel.launch import launch
    from workbench.parallel.plan import balanced_stages, check_tp

    if str(check.model).startswith(PRESET_PREFIX):
        raise WorkbenchError("a preset's ranks draw their own random shards, so its grids are "
                             "not one model: give a checkpoint directory or 'bundled'")
    config = config_of(check.model)
    for par in check.grids:  # bad sizes fail here, before any rank starts
        check_tp(config, par.tp)
        balanced_stages(config, par.pp)
    dev = resolve_device(device)
    with torch.inference_mode():
        exact_model = load_model(check.model, dev)
        ids = sequences(check, exact_model)
        exact = exact_model(ForwardBatch.prefill(ids.to(dev))).float().cpu()
        del exact_model
        low = load_model(check.model, dev, getattr(torch, check.dtype))
        one = low(ForwardBatch.prefill(ids.to(dev))).float().cpu()
        del low
    logits: dict[ParallelConfig, torch.Tensor] = {}
    for size in sorted({g.world_size for g in check.grids}):
        part = tuple(g for g in check.grids if g.world_size == size)
        got = launch(score_worker, size, dataclasses.replace(check, grids=part), ids,
                     device=dev.type, backend=backend, timeout_s=timeout_s, threads=threads)[0]
        logits |= dict(zip(part, got))
    rows = [{"grid": str(g), "tp": g.tp, "pp": g.pp, "micro_batches": g.micro_batches,
             **compare(logits[g], one, exact)} for g in check.grids]
    return {"sequences": ids.tolist(), "rows": rows}
