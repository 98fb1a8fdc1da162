"""Anatomy of a model: where the parameters, the bytes and the time of one decode step go.

* :func:`parameter_table` counts parameters and bytes per component (embedding, q/k/v/o
  projections, MLP, norms, LM head). With tied embeddings the LM head *is* the embedding matrix
  and adds nothing: the total equals :meth:`ModelConfig.num_parameters`.
* :func:`forward_cost` gives the FLOPs and the least bytes a forward pass must move, hence its
  arithmetic intensity ``I = flops / bytes``: a decode step does ~2 FLOP per weight while
  reading every weight once (I ~ 2 / bytes_per_element, memory-bound); a prefill of P tokens
  reuses each weight P times (I ~ 2P / bytes_per_element).
* :func:`decode_step_profile` times one decode step component by component. The step is spelled
  out stage by stage with the model's own modules and functions (checked to give the same logits
  as :meth:`LlamaModel.forward`), with a device sync and a timer around each stage; the same step
  timed without instrumentation, and the floor ``(weight bytes + KV bytes) / bandwidth``, sit beside
  it. Taught in notebook ``00_tour``.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from workbench.attention.masks import causal_mask
from workbench.attention.sdpa import sdpa
from workbench.engine.sampling import SamplingParams, sample
from workbench.errors import WorkbenchError
from workbench.kv.contiguous import ContiguousKVCache
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig
from workbench.model.llama import LlamaModel
from workbench.model.rope import apply_rope, rope_cos_sin
from workbench.roofline import Roofline

__all__ = ["COMPONENTS", "decode_step_profile", "forward_cost", "measure_forward",
           "parameter_table", "rows_text", "shares_by_kind"]

_MIB = 1 << 20
COMPONENTS = ("embedding", "norms", "attention projections", "RoPE", "KV cache write",
              "attention (SDPA)", "MLP", "residual adds", "LM head", "sampling")
_LABELS = {"embed_tokens": "embedding", "norm": "norms", "input_layernorm": "norms",
           "post_attention_layernorm": "norms", "lm_head": "LM head"}


def parameter_table(model: LlamaModel) -> list[dict[str, Any]]:
    """One row per component: shape of one tensor, tensors, parameters, bytes, MiB and share.

    Rows come from ``model.named_parameters()`` grouped by name with the layer index removed
    (``layers.3.self_attn.q_proj.weight`` -> ``attention q_proj``; biases join their weight). A
    tied LM head gets a row with 0 parameters and a note. The last row is the total, shared
    tensors counted once, so it equals ``sum(p.numel() for p in model.parameters())``.
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():  # a tied weight is listed once
        key = re.sub(r"^layers\.\d+\.", "", name).rsplit(".", 1)[0]
        label = _LABELS.get(key) or key.replace("self_attn.", "attention ").replace("mlp.", "MLP ")
        row = groups.setdefault(label, {"component": label, "shape": tuple(p.shape), "tensors": 0,
                                        "parameters": 0, "bytes": 0, "note": ""})
        row["tensors"] += name.endswith("weight")
        row["parameters"] += p.numel()
        row["bytes"] += p.numel() * p.element_size()
    if model.lm_head.weight is model.embed_tokens.weight:
        groups["LM head"] = {"component": "LM head", "shape": tuple(model.lm_head.weight.shape),
                             "tensors": 0, "parameters": 0, "bytes": 0,
                             "note": "tied to the embedding: no extra parameters"}
    total = {"component": "total", "shape": (), "tensors": sum(r["tensors"] for r in groups.values()),
             "parameters": sum(r["parameters"] for r in groups.values()),
             "bytes": sum(r["bytes"] for r in groups.values()), "note": ""}
    rows = [*groups.values(), total]
    for row in rows:
        row["MiB"] = row["bytes"] / _MIB
        row["share"] = row["bytes"] / max(1, total["bytes"])
    return rows


def shares_by_kind(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Byte shares of :func:`parameter_table` rows summed by kind: ``attention q_proj`` and the
    other projections count as ``attention``, the three MLP matrices as ``MLP``."""
    out: dict[str, float] = {}
    for row in rows:
        if row["component"] != "total":
            name = row["component"]
            kind = name.split(" ")[0] if name.startswith(("attention ", "MLP ")) else name
            out[kind] = out.get(kind, 0.0) + row["share"]
    return out


def forward_cost(config: ModelConfig, batch_size: int, new_tokens: int, context_len: int = 0,
                 bytes_per_element: int = 4, last_only: bool = True) -> dict[str, float]:
    """FLOPs and least bytes moved by one forward pass of ``new_tokens`` per row after
    ``context_len`` cached tokens, and their ratio, the arithmetic ``intensity`` (FLOP/byte).

    FLOPs: 2 per weight per token for every projection (the LM head only for the last token when
    ``last_only``), plus attention ``4 * heads * head_dim`` per (query, visible key) pair (QK^T and
    PV). Bytes: every weight read once (an untied embedding only for the looked-up rows) plus the
    KV cache read and written once; activations are ignored (they stay in caches or registers).
    """
    c, B, T = config, batch_size, new_tokens
    h, d = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    layer_matmul = h * (q + 2 * kv) + q * h + 3 * h * c.intermediate_size  # weights per layer
    head_tokens = B * (1 if last_only else T)
    keys_seen = T * context_len + T * (T + 1) // 2  # causal: query t sees context + t + 1 keys
    flops = (2 * B * T * layer_matmul * c.num_hidden_layers + 2 * head_tokens * c.vocab_size * h
             + 4 * c.num_attention_heads * d * keys_seen * B * c.num_hidden_layers)
    weights = c.num_parameters()
    if not c.tie_word_embeddings:  # the embedding is gathered, not streamed
        weights -= c.vocab_size * h - min(B * T, c.vocab_size) * h
    weight_bytes = weights * bytes_per_element
    kv_bytes = B * (context_len + T) * c.kv_bytes_per_token(bytes_per_element)
    nbytes = weight_bytes + kv_bytes
    return {"flops": float(flops), "weight_bytes": float(weight_bytes),
            "kv_bytes": float(kv_bytes), "bytes": float(nbytes), "intensity": flops / nbytes}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class _Stopwatch:
    """Wall time per named section, with the device synchronised on entry and exit so that
    asynchronous GPU work is charged to the section that launched it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[name] += time.perf_counter() - start


def _step_inputs(model: LlamaModel, batch_size: int, new_tokens: int,
                 context_len: int) -> tuple[ForwardBatch, ContiguousKVCache]:
    """A batch of random tokens after ``context_len`` cached tokens (random keys/values)."""
    if batch_size < 1 or new_tokens < 1 or context_len < 0:
        raise WorkbenchError(f"need batch_size >= 1, new_tokens >= 1, context_len >= 0; got "
                             f"{batch_size}, {new_tokens}, {context_len}")
    device, B, T, S = model.device, batch_size, new_tokens, context_len + new_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    kv = ContiguousKVCache(model.config, B, S, device, model.dtype)
    for t in (*kv.k.values(), *kv.v.values()):
        t[:, :, :context_len].normal_(generator=gen)  # stands in for a prefilled prompt
    ids = torch.randint(model.config.vocab_size, (B, T), generator=gen, device=device)  # [B, T]
    positions = torch.arange(context_len, S, device=device).expand(B, T)  # [B, T]
    mask = causal_mask(T, S, device)[None, None].expand(B, 1, T, S)  # [B, 1, T, S]
    return ForwardBatch(ids, positions, mask, kv_start=context_len), kv


def _instrumented_step(model: LlamaModel, batch: ForwardBatch, kv: ContiguousKVCache,
                       sampling: SamplingParams, generators: list[torch.Generator],
                       watch: _Stopwatch) -> torch.Tensor:
    """One decode step, stage by stage: the maths of :meth:`LlamaModel.forward` (last column)."""
    with watch("embedding"):
        x = model.embed(batch)  # [B, T, hidden]
    with watch("RoPE"):
        cos, sin = rope_cos_sin(model.inv_freq, batch.positions, x.dtype)  # [B, T, d] each
    B, T, _ = x.shape
    for layer in model.layers:
        attn = layer.self_attn
        H, Hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        with watch("norms"):
            h = layer.input_layernorm(x)
        with watch("attention projections"):
            q = attn.q_proj(h).view(B, T, H, d).transpose(1, 2)  # [B, H, T, d]
            k = attn.k_proj(h).view(B, T, Hkv, d).transpose(1, 2)  # [B, Hkv, T, d]
            v = attn.v_proj(h).view(B, T, Hkv, d).transpose(1, 2)  # [B, Hkv, T, d]
        with watch("RoPE"):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        with watch("KV cache write"):  # kv.attend = update, then sdpa: timed apart here
            k, v = kv.update(attn.layer, k, v, batch)  # [B, Hkv, S, d]
        with watch("attention (SDPA)"):
            out = sdpa(q, k, v, batch.mask, causal=batch.mask is None)  # [B, H, T, d]
        with watch("attention projections"):
            o = attn.o_proj(out.transpose(1, 2).reshape(B, T, H * d))  # [B, T, hidden]
        with watch("residual adds"):
            x = x + o
        with watch("norms"):
            h = layer.post_attention_layernorm(x)
        with watch("MLP"):
            m = layer.mlp(h)
        with watch("residual adds"):
            x = x + m
    with watch("norms"):
        h = model.norm(x[:, -1])  # [B, hidden]
    with watch("LM head"):
        logits = model.lm_head(h)  # [B, vocab]
    with watch("sampling"):
        sample(logits, sampling, generators)
    return logits


@torch.inference_mode()
def decode_step_profile(model: LlamaModel, batch_size: int = 1, context_len: int = 512,
                        repeats: int = 20, warmup: int = 3, roofline: Roofline | None = None,
                        sampling: SamplingParams = SamplingParams()) -> list[dict[str, Any]]:
    """Where the time of ONE decode step goes, with ``context_len`` tokens already cached.

    Returns one row per component of :data:`COMPONENTS` (``kind="component"``: median
    ``seconds`` over ``repeats`` after ``warmup`` steps, ``ms``, ``share`` of their sum), then the
    step (forward + sampling) timed without instrumentation (``kind="total"``, with the step's
    ``flops``, ``bytes`` and ``intensity``), and, when ``roofline`` is given, the memory floor
    ``(weight bytes + KV bytes) / bandwidth`` (``kind="floor"``). Instrumented and plain steps
    alternate so that both see the same machine load. :class:`WorkbenchError` is raised if the
    instrumented step's logits differ from :meth:`LlamaModel.forward`'s (checked on the first).
    """
    if repeats < 1:
        raise WorkbenchError(f"repeats must be >= 1, got {repeats}")
    device, B = model.device, batch_size
    batch, kv = _step_inputs(model, B, 1, context_len)
    generators = [sampling.generator(i) for i in range(B)]
    parts: dict[str, list[float]] = {name: [] for name in COMPONENTS}
    totals = []
    for i in range(warmup + repeats):
        watch = _Stopwatch(device)
        logits = _instrumented_step(model, batch, kv, sampling, generators, watch)
        with watch("plain step"):
            reference = model(batch, kv, last_only=True)  # [B, vocab]
            sample(reference, sampling, generators)
        if i == 0 and not torch.allclose(logits, reference, rtol=1e-4, atol=1e-4):
            raise WorkbenchError("the instrumented decode step no longer matches "
                                 "LlamaModel.forward: update workbench/anatomy.py")
        if i >= warmup:
            totals.append(watch.seconds["plain step"])
            for name in COMPONENTS:
                parts[name].append(watch.seconds[name])
    medians = {name: statistics.median(times) for name, times in parts.items()}
    parts_sum = sum(medians.values())
    rows: list[dict[str, Any]] = [
        {"component": name, "kind": "component", "seconds": s, "share": s / parts_sum}
        for name, s in medians.items()]
    cost = forward_cost(model.config, B, 1, context_len, model.dtype.itemsize)
    total = statistics.median(totals)
    rows.append({"component": "step, uninstrumented", "kind": "total", "seconds": total,
                 "share": total / parts_sum, **cost})
    if roofline is not None:
        floor = roofline.decode_step_floor(cost["weight_bytes"], cost["kv_bytes"])
        rows.append({"component": "memory-bandwidth floor", "kind": "floor", "seconds": floor,
                     "share": floor / parts_sum, "bytes": cost["bytes"],
                     "bandwidth": roofline.bandwidth})
    for row in rows:
        row["ms"] = row["seconds"] * 1e3
    return rows


@torch.inference_mode()
def measure_forward(model: LlamaModel, batch_size: int = 1, new_tokens: int = 1,
                    context_len: int = 0, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one forward pass (``new_tokens`` per row after ``context_len`` cached),
    with its :func:`forward_cost` and the achieved ``flops_per_s`` (a point for the roofline)."""
    if repeats < 1:
        raise WorkbenchError(f"repeats must be >= 1, got {repeats}")
    batch, kv = _step_inputs(model, batch_size, new_tokens, context_len)
    times = []
    for i in range(warmup + repeats):
        watch = _Stopwatch(model.device)
        with watch("forward"):
            model(batch, kv, last_only=True)
        if i >= warmup:
            times.append(watch.seconds["forward"])
    seconds = statistics.median(times)
    cost = forward_cost(model.config, batch_size, new_tokens, context_len, model.dtype.itemsize)
    return {"seconds": seconds, **cost, "flops_per_s": cost["flops"] / seconds}


def rows_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``columns`` of ``rows``: ints with separators, floats to 2 places,
    ``share`` as a percentage, shapes as ``A x B``."""
    def fmt(key: str, value: Any) -> str:
        if value is None:
            return ""
        if key == "share":
            return f"{100 * value:.1f}%"
        if isinstance(value, tuple):
            return " x ".join(map(str, value))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"

    cells = [list(columns)] + [[fmt(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    cells.insert(1, ["-" * w for w in widths])
    left = {0} | {i for i, c in enumerate(columns) if c == "note"}  # text columns
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells)
