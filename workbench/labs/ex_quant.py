"""Lab 07 (quantization): each group's scale and offset, and the integer codes on that grid.

The references are the two steps of the library's :func:`~workbench.quant.groupwise.quantize`:
:func:`~workbench.quant.groupwise.group_scales` and :func:`~workbench.quant.groupwise.group_codes`
(packing comes after). Both are plug-in points, so the lab quantizes the bundled model with the
student's functions (:func:`~workbench.quant.linear.quantize_model`) and measures what it costs in
perplexity and greedy tokens. Taught in notebook 07.
"""

from __future__ import annotations

import random

import torch

import workbench.quant.groupwise  # noqa: F401 - registers the plug-in points
from workbench.labs.check import Exercise, compare_values, describe, register
from workbench.plug import library
from workbench.quant.groupwise import QuantConfig


def _config(rng: random.Random) -> QuantConfig:
    return QuantConfig(rng.choice([4, 8]), None, rng.random() < 0.5,
                       rng.choice([torch.float16, torch.float16, torch.float32]))


def _groups(rng: random.Random) -> torch.Tensor:
    """Float32 ``[rows, G, size]``: Gaussian weights, now and then an outlier, an all-positive
    group or a constant one."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    shape = (rng.randint(1, 3), rng.randint(1, 4), rng.choice([2, 4, 8, 16, 32]))
    x = torch.randn(shape, generator=gen) * rng.choice([0.02, 1.0, 30.0])
    kind = rng.random()
    if kind < 0.2:
        x[0, 0, 0] *= 20  # an outlier stretches its group's grid
    elif kind < 0.35:
        x = x.abs() + 0.5  # all positive: the asymmetric offset is above 0
    elif kind < 0.45:
        x[-1, -1] = x[-1, -1, 0]  # a constant group
    return x


def _scales_case(rng: random.Random) -> dict:
    return {"x": _groups(rng), "config": _config(rng)}


def _codes_case(rng: random.Random) -> dict:
    x, config = _groups(rng), _config(rng)
    scale, zero = library("quant.scales")(x, config)
    return {"x": x, "scale": scale, "zero": zero, "config": config}


def compare_scales(got, expected) -> str | None:
    """Scales (and offsets) stored in the config's dtype, equal up to two steps of that dtype
    (rounding the scale up, and the offset down, moves them by one)."""
    if not isinstance(got, (list, tuple)) or len(got) != 2:
        return f"expected a pair (scale, zero), got {describe(got)}"
    for what, g, e in (("scale", got[0], expected[0]), ("zero", got[1], expected[1])):
        if e is None:
            if g is not None:
                return f"{what}: expected None (symmetric: no offset), got {describe(g)}"
            continue
        if not isinstance(g, torch.Tensor):
            return f"{what}: expected a tensor, got {describe(g)}"
        if g.dtype != e.dtype:
            return f"{what}: dtype {g.dtype}, expected {e.dtype} (config.scale_dtype)"
        why = compare_values(g, e, atol=1e-6, rtol=2.5e-3)
        if why:
            return f"{what}: {why}"
    return None


SCALES = register(Exercise(
    name="quant.scales",
    title="scale and offset of every group (symmetric and asymmetric)",
    reference=library("quant.scales"),
    cases=_scales_case,
    edge_cases=(
        {"x": torch.tensor([[[-1.0, 0.5, 0.25, 2.0]]]), "config": QuantConfig(4, None, True)},
        {"x": torch.tensor([[[-1.0, 0.5, 0.25, 2.0]]]), "config": QuantConfig(4, None, False)},
        {"x": torch.tensor([[[1.0, 2.0], [3.0, 7.0]]]), "config": QuantConfig(8, None, False,
                                                                              torch.float32)},
        {"x": torch.zeros(1, 2, 4), "config": QuantConfig(8, None, True)},
    ),
    hints=(
        "Reduce over the last dimension (the values of one group): x.abs().amax(-1) for the "
        "symmetric scale, x.amin(-1) and x.amax(-1) for the asymmetric one. qmax is config.qmax.",
        "Symmetric: scale = max|x| / qmax, zero = None. Asymmetric: zero = min(x), scale = "
        "(max(x) - zero) / qmax. Store both in config.scale_dtype (.to(config.scale_dtype)).",
        "Round for storage: eps = torch.finfo(config.scale_dtype).eps; zero = (low - low.abs() * "
        "eps).to(dtype) and span = max - zero.float(); scale = (span / qmax * (1 + eps))"
        ".clamp(min=torch.finfo(dtype).tiny).to(dtype).",
    ),
    compare=compare_scales,
    plug="quant.scales",
    notebook="07_quantization",
))

CODES = register(Exercise(
    name="quant.codes",
    title="integer codes of every value on its group's grid",
    reference=library("quant.codes"),
    cases=_codes_case,
    edge_cases=(
        {"x": torch.tensor([[[-1.0, 0.5, 0.25, 2.0]]]), "scale": torch.tensor([[2 / 7]]),
         "zero": None, "config": QuantConfig(4, None, True)},
        {"x": torch.tensor([[[-1.0, 0.5, 0.25, 2.0]]]), "scale": torch.tensor([[0.2]]),
         "zero": torch.tensor([[-1.0]]), "config": QuantConfig(4, None, False)},
        {"x": torch.tensor([[[-2.0, 0.5, 2.0, 1.9]]]), "scale": torch.tensor([[0.25]]),
         "zero": None, "config": QuantConfig(4, None, True)},  # codes past qmax: clamp
    ),
    hints=(
        "Every value uses the scale (and offset) of its group: scale is [..., G] and x is "
        "[..., G, size], so add a last dimension: scale[..., None].",
        "q = round((x - zero) / scale), or round(x / scale) when zero is None; use torch.round and "
        "compute in float32 (zero.float(), scale.float()).",
        "Clamp to the code range: [-qmax, qmax] when symmetric, [0, qmax] when asymmetric "
        "(q.clamp(low, config.qmax)); return float32 codes [..., G, size].",
    ),
    plug="quant.codes",
    notebook="07_quantization",
))


def quantized_quality(model, config: QuantConfig, windows: torch.Tensor, prompts: list[list[int]],
                      reference: torch.Tensor | None = None, max_new_tokens: int = 12) -> dict:
    """Quantize a copy of ``model``'s linear layers with ``config`` (through ``group_scales`` and
    ``group_codes``, or plugged-in replacements); its held-out perplexity and agreement with the
    full-precision logits (``reference``, computed when None) on ``windows``, its weight bytes and
    its greedy tokens for ``prompts``."""
    import copy

    from workbench.engine import Request, run_static
    from workbench.quant.eval import evaluate, reference_logits
    from workbench.quant.linear import quantize_model, weight_bytes

    quant = quantize_model(copy.deepcopy(model), config)
    if reference is None:
        reference = reference_logits(model, windows)
    result = evaluate(quant, windows, reference)
    requests = [Request(tuple(p), max_new_tokens, ignore_eos=True, id=i)
                for i, p in enumerate(prompts)]
    run = run_static(quant, requests, batch_size=len(requests))
    return {"perplexity": result.perplexity, "top1_agreement": result.top1_agreement,
            "tokens": [t.output_ids for t in run.traces], "weight_bytes": weight_bytes(quant)}
