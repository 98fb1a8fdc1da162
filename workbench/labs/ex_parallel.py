"""Lab 04 (tensor parallelism): which part of each weight a rank holds, and the vocabulary split.

The references are the functions the ranks use to cut the checkpoint: :func:`tp_slice`
(:mod:`workbench.parallel.shards`: column-parallel q/k/v and gate/up split by output rows,
row-parallel o_proj and down_proj by input columns, the rest whole) and :func:`vocab_range`
(:mod:`workbench.parallel.tensor`: ceil(V/tp) embedding rows a rank). Both are plug-in points, and
:func:`workbench.parallel.launch.launch` installs the parent's overrides on every rank, so the lab
runs a real TP=2 generation with the student's cut. Taught in notebook 04.
"""

from __future__ import annotations

import random

import workbench.parallel.shards  # noqa: F401 - registers the plug-in points
from workbench.labs.check import Exercise, register
from workbench.plug import library

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _shapes(H: int, Hkv: int, d: int, hidden: int, inter: int, vocab: int) -> dict[str, tuple]:
    """Checkpoint tensor names (one layer's, plus the rest) of a Llama model -> full shapes."""
    layer = "layers.{i}."
    out = {
        "self_attn.q_proj.weight": (H * d, hidden), "self_attn.k_proj.weight": (Hkv * d, hidden),
        "self_attn.v_proj.weight": (Hkv * d, hidden), "self_attn.o_proj.weight": (hidden, H * d),
        "self_attn.q_proj.bias": (H * d,), "self_attn.k_proj.bias": (Hkv * d,),
        "self_attn.v_proj.bias": (Hkv * d,), "self_attn.o_proj.bias": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter), "mlp.down_proj.bias": (hidden,),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
    }
    shapes = {layer + k: v for k, v in out.items()}
    shapes |= {"embed_tokens.weight": (vocab, hidden), "norm.weight": (hidden,),
               "lm_head.weight": (vocab, hidden)}
    return shapes


def _slice_case(rng: random.Random) -> dict:
    tp = rng.choice([1, 2, 2, 4, 4, 8])
    Hkv = tp * rng.randint(1, 2)  # every rank holds whole KV heads
    H, d = Hkv * rng.choice([1, 2, 4]), rng.choice([2, 4, 8])  # GQA: H / Hkv query heads a group
    shapes = _shapes(H, Hkv, d, hidden=rng.choice([H * d, 2 * H * d]),
                     inter=tp * rng.randint(1, 6) * 4, vocab=rng.randint(50, 200))
    name = rng.choice(sorted(shapes))
    return {"name": name.format(i=rng.randrange(32)), "shape": shapes[name], "tp": tp,
            "tp_rank": rng.randrange(tp)}


def _vocab_case(rng: random.Random) -> dict:
    tp = rng.choice([1, 2, 3, 4, 8])
    vocab = rng.choice([rng.randint(1, 40), tp * rng.randint(1, 30), rng.randint(100, 50000)])
    return {"vocab_size": vocab, "tp": tp, "tp_rank": rng.randrange(tp)}


TP_SLICE = register(Exercise(
    name="tp.slice",
    title="the part of a checkpoint tensor that a tensor-parallel rank holds",
    reference=library("tp.slice"),
    cases=_slice_case,
    edge_cases=(
        {"name": "layers.0.self_attn.q_proj.weight", "shape": (8, 8), "tp": 2, "tp_rank": 1},
        {"name": "layers.0.self_attn.k_proj.weight", "shape": (4, 8), "tp": 2, "tp_rank": 1},
        {"name": "layers.3.self_attn.o_proj.weight", "shape": (8, 8), "tp": 2, "tp_rank": 0},
        {"name": "layers.3.self_attn.o_proj.bias", "shape": (8,), "tp": 2, "tp_rank": 1},
        {"name": "layers.1.mlp.down_proj.weight", "shape": (8, 24), "tp": 4, "tp_rank": 3},
        {"name": "layers.1.mlp.up_proj.weight", "shape": (24, 8), "tp": 1, "tp_rank": 0},
        {"name": "layers.2.post_attention_layernorm.weight", "shape": (8,), "tp": 2, "tp_rank": 1},
        {"name": "embed_tokens.weight", "shape": (100, 8), "tp": 2, "tp_rank": 0},
    ),
    hints=(
        "Column-parallel layers (q_proj, k_proj, v_proj, gate_proj, up_proj) split their OUTPUT "
        "features, dim 0 of the weight [out, in] and of the bias [out]; row-parallel layers "
        "(o_proj, down_proj) split the weight's INPUT features, dim 1. Everything else: None.",
        "A row-parallel layer's bias is added once, after the all-reduce: every rank holds it "
        "whole (None). The layer's kind is the name's second-to-last part: name.split('.')[-2].",
        "n = shape[dim] // tp; rank r holds [r * n, (r + 1) * n): return (dim, r * n, "
        "(r + 1) * n). With GQA nothing changes: k_proj's Hkv * head_dim rows split into Hkv / tp "
        "whole heads.",
    ),
    plug="tp.slice",
    notebook="04_tensor_parallelism",
))

VOCAB_RANGE = register(Exercise(
    name="tp.vocab_range",
    title="the rows of the vocabulary a rank holds (vocabulary parallelism)",
    reference=library("tp.vocab_range"),
    cases=_vocab_case,
    edge_cases=({"vocab_size": 8, "tp": 2, "tp_rank": 1}, {"vocab_size": 10, "tp": 4, "tp_rank": 3},
                {"vocab_size": 5, "tp": 4, "tp_rank": 3}, {"vocab_size": 1, "tp": 2, "tp_rank": 1},
                {"vocab_size": 7, "tp": 1, "tp_rank": 0}),
    hints=(
        "Every rank gets the same number of rows, per = ceil(V / tp) (so the shards have one "
        "shape), except that no rank goes past the vocabulary.",
        "per = -(-vocab_size // tp) is ceil without floats. Rank r starts at r * per.",
        "return (min(r * per, vocab_size), min((r + 1) * per, vocab_size)): the last ranks may "
        "get fewer rows, or none (start == end == vocab_size).",
    ),
    plug="tp.vocab_range",
    notebook="04_tensor_parallelism",
))


def rank_heads(config, tp: int) -> list[dict]:
    """What each rank holds of layer 0's attention, read off the slices that :func:`tp_slice` (or a
    plugged-in replacement) cuts: its query heads, its KV heads and the KV heads its queries use."""
    from workbench.parallel.shards import tp_slice

    d, group = config.head_dim, config.num_attention_heads // config.num_key_value_heads
    rows = []
    for r in range(tp):
        _, q0, q1 = tp_slice("layers.0.self_attn.q_proj.weight",
                             (config.num_attention_heads * d, config.hidden_size), tp, r)
        _, k0, k1 = tp_slice("layers.0.self_attn.k_proj.weight",
                             (config.num_key_value_heads * d, config.hidden_size), tp, r)
        q_heads, kv_heads = list(range(q0 // d, q1 // d)), list(range(k0 // d, k1 // d))
        rows.append({"rank": r, "query_heads": q_heads, "kv_heads": kv_heads,
                     "kv_heads_used": sorted({h // group for h in q_heads})})
    return rows


def tp_generation(prompts: list[list[int]], max_new_tokens: int = 8, tp: int = 2,
                  vocab_parallel: bool = True, timeout_s: float = 120.0) -> dict:
    """Greedy generation of the bundled model on ``tp`` spawned CPU ranks (gloo), every rank reading
    its slices of the checkpoint, then the same requests on rank 0 alone (the reference). Overrides
    active here reach the ranks. Returns both runs' tokens and the bytes each rank read."""
    from workbench.engine import Request
    from workbench.parallel import GenerateJob, ParallelConfig, generate_parallel

    requests = tuple(Request(tuple(p), max_new_tokens, id=i) for i, p in enumerate(prompts))
    jobs = [GenerateJob("bundled", requests, ParallelConfig(tp=tp, vocab_parallel=vocab_parallel),
                        "static", batch_size=len(requests)),
            GenerateJob("bundled", requests, ParallelConfig(), "static", batch_size=len(requests))]
    split, whole = generate_parallel(jobs, "cpu", timeout_s)
    return {"tokens": [t.output_ids for t in split["run"].traces],
            "one_device": [t.output_ids for t in whole["run"].traces],
            "bytes_read": [r["bytes_read"] for r in split["ranks"]]}
