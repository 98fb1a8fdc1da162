"""How much quantization costs in quality: held-out perplexity, logit error, greedy agreement.

    perplexity = exp( mean over predicted tokens of  -log p(token_{t+1} | tokens_<=t) )

measured on windows of held-out standard-library code the bundled model never saw in training
(:func:`workbench.training.prompts.load_heldout_text`). The windows start at line starts spread
evenly over the whole held-out text, so a few thousand tokens sample many files. The logit error
compares a quantized model's logits with the full-precision model's on the same tokens, and the
top-1 agreement counts the positions where both predict the same next token. Taught in notebook
``07_quantization``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel
from workbench.quant.groupwise import QuantConfig, quantize

KVFactory = Callable[[int, int], KVCache]  # (batch size, max length) -> an empty cache


@dataclass(frozen=True)
class EvalResult:
    """Quality of one model on the held-out windows (errors against a reference's logits)."""

    perplexity: float
    tokens: int  # next-token predictions scored
    max_logit_error: float | None = None  # max |logits - reference logits|
    top1_agreement: float | None = None  # fraction of positions with the reference's argmax


def heldout_windows(tokenizer=None, num_windows: int = 16, seq_len: int = 256) -> torch.Tensor:
    """Token ids [num_windows, seq_len] from held-out code, windows spread over the whole text."""
    from workbench.training.prompts import load_heldout_text

    if num_windows < 1 or seq_len < 2:
        raise WorkbenchError(f"need num_windows >= 1 and seq_len >= 2, got {num_windows}, "
                             f"{seq_len}")
    if tokenizer is None:
        from workbench.model.loading import load_tokenizer

        tokenizer = load_tokenizer("bundled")
    text = load_heldout_text()
    stride = len(text) // num_windows
    rows = []
    for i in range(num_windows):
        start = text.find("\n", i * stride) + 1  # begin on a line start
        ids = tokenizer(text[start:start + 12 * seq_len])["input_ids"]  # ~3.7 chars a token
        if len(ids) < seq_len:
            raise WorkbenchError(f"held-out text too short for {num_windows} windows of "
                                 f"{seq_len} tokens")
        rows.append(ids[:seq_len])
    return torch.tensor(rows)  # [num_windows, seq_len]


@torch.inference_mode()
def window_logits(model: LlamaModel, ids: torch.Tensor,
                  kv_factory: KVFactory | None = None) -> torch.Tensor:
    """Float32 logits [B, T, vocab] of one forward pass over ``ids`` [B, T], through a fresh
    cache from ``kv_factory`` when given (so that attention reads the cache's stored keys)."""
    ids = ids.to(model.device)
    kv = None if kv_factory is None else kv_factory(ids.shape[0], ids.shape[1])
    return model(ForwardBatch.prefill(ids), kv).float()


def evaluate(model: LlamaModel, windows: torch.Tensor, reference: torch.Tensor | None = None,
             batch_size: int = 8, kv_factory: KVFactory | None = None,
             progress: bool = False) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` [N, T]; errors against ``reference`` logits
    [N, T, vocab] (from :func:`reference_logits`) when given."""
    from tqdm.auto import tqdm

    nll, count, max_err, agree = 0.0, 0, 0.0, 0
    for lo in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="eval"):
        ids = windows[lo:lo + batch_size]
        logits = window_logits(model, ids, kv_factory)  # [b, T, vocab]
        targets = ids[:, 1:].to(logits.device)  # [b, T-1]: token t+1 is predicted at t
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                               reduction="sum").item()
        count += targets.numel()
        if reference is not None:
            ref = reference[lo:lo + batch_size].to(logits.device)
            max_err = max(max_err, (logits - ref).abs().max().item())
            agree += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
    if reference is None:
        return EvalResult(float(torch.tensor(nll / count).exp()), count)
    return EvalResult(float(torch.tensor(nll / count).exp()), count, max_err,
                      agree / windows.numel())


def reference_logits(model: LlamaModel, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Float32 logits [N, T, vocab] of the unquantized model, kept on the CPU."""
    return torch.cat([window_logits(model, windows[lo:lo + batch_size]).cpu()
                      for lo in range(0, len(windows), batch_size)])


def weight_error(model: torch.nn.Module, config: QuantConfig) -> float:
    """Relative error ``||W - W_hat|| / ||W||`` over all decoder-layer linear weights of ``model``
    (unquantized), if they were quantized with ``config``."""
    err = norm = 0.0
    for layer in model.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight.detach().float()
                err += (w - quantize(w, config).dequantize()).pow(2).sum().item()
                norm += w.pow(2).sum().item()
    return (err / norm) ** 0.5


def greedy_agreement(outputs: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """How far greedy generations agree with reference generations of the same prompts.

    ``token_agreement``: the fraction of reference tokens reproduced at the same position;
    ``identical``: the fraction of sequences reproduced exactly; ``mean_prefix``: the mean number
    of tokens before the first difference (one early change alters everything after it).
    """
    if len(outputs) != len(reference) or not reference:
        raise WorkbenchError(f"need as many outputs as references (> 0), got {len(outputs)} and "
                             f"{len(reference)}")
    same = total = 0
    prefixes = []
    for out, ref in zip(outputs, reference):
        same += sum(a == b for a, b in zip(out, ref))
        total += len(ref)
        prefix = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out),
                                                                                  len(ref)))
        prefixes.append(prefix)
    return {"token_agreement": same / max(1, total),
            "identical": sum(o == r for o, r in zip(outputs, reference)) / len(reference),
            "mean_prefix": sum(prefixes) / len(prefixes)}
