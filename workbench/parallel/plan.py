"""How a model is cut across ranks: the TP x PP grid, the head/column shards, the balanced stages.

Ranks form a grid of ``pp`` pipeline stages, each a group of ``tp`` tensor-parallel ranks::

    rank = stage * tp + tp_rank          (tp = 2, pp = 2:  stage 0 = ranks 0, 1;  stage 1 = 2, 3)

Tensor parallelism gives each rank of a stage ``1/tp`` of every layer (its attention heads, its
slice of the MLP); pipeline parallelism gives each stage a run of whole layers. Notebook 04 teaches
the first, notebook 05 the second.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig

__all__ = ["Mesh", "ParallelConfig", "alone_mesh", "balanced_stages", "check_tp", "make_mesh",
           "shard_config", "stage_costs"]


@dataclass(frozen=True)
class ParallelConfig:
    """``tp`` ranks per stage, ``pp`` stages, ``micro_batches`` per pipelined forward pass."""

    tp: int = 1
    pp: int = 1
    micro_batches: int = 1  # GPipe: rows of a batch split into this many micro-batches
    vocab_parallel: bool = False  # split the embedding and LM head by vocabulary rows too

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "micro_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise WorkbenchError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return (f"TP{self.tp}xPP{self.pp}" + (f" m={self.micro_batches}" if self.pp > 1 else "")
                + (" vocab-parallel" if self.vocab_parallel else ""))


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise WorkbenchError unless heads, KV heads and the MLP width all split ``tp`` ways."""
    names = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    for name in names:
        value = getattr(config, name)
        if value % tp:
            fits = [t for t in range(1, config.num_key_value_heads + 1)
                    if all(getattr(config, n) % t == 0 for n in names)]
            raise WorkbenchError(f"tensor parallelism {tp} needs {name} ({value}) divisible by "
                                 f"{tp}; this model splits {', '.join(map(str, fits))} ways (the "
                                 f"sizes that divide its heads, KV heads and MLP width)")


def shard_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The shape of one TP rank's shard: ``1/tp`` of the query heads, KV heads and MLP width.

    Everything else (hidden size, head dim, vocabulary, context, EOS) is unchanged, so the
    model's own classes build the shard and the KV storage holds ``Hkv / tp`` heads per rank.
    """
    check_tp(config, tp)
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp,
                               num_key_value_heads=config.num_key_value_heads // tp,
                               intermediate_size=config.intermediate_size // tp)


def _layer_cost(config: ModelConfig) -> int:
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return h * (2 * q + 2 * kv) + 3 * h * i  # weights read per token = decode time


def _stage_cost(config: ModelConfig, layers: int, last: bool) -> int:
    return layers * _layer_cost(config) + (config.vocab_size * config.hidden_size if last else 0)


def stage_costs(config: ModelConfig, stages: list[range]) -> list[int]:
    """Weights each stage reads per decode token: its layers', and the LM head's on the last one
    (``vocab x hidden``). The cost :func:`balanced_stages` balances."""
    return [_stage_cost(config, len(r), i == len(stages) - 1) for i, r in enumerate(stages)]


def balanced_stages(config: ModelConfig, pp: int) -> list[range]:
    """Split the layers into ``pp`` runs of consecutive layers with the least maximum cost.

    A layer costs its weight count (decode reads every weight once); the last stage also pays
    the LM head (``vocab x hidden``): :func:`stage_costs`. Exact linear partition by dynamic
    programming; where several splits share the least maximum, the first found (earlier stages
    as short as that allows) is returned.
    """
    n = config.num_hidden_layers
    if pp > n:
        raise WorkbenchError(f"pipeline parallelism {pp} needs at least {pp} layers; the model "
                             f"has {n}")
    cost = lambda a, b, last: _stage_cost(config, b - a, last)  # noqa: E731
    best: dict[tuple[int, int], tuple[int, list[int]]] = {}  # (stage, start) -> (max cost, cuts)

    def solve(stage: int, start: int) -> tuple[int, list[int]]:
        if stage == pp - 1:
            return cost(start, n, True), []
        if (stage, start) not in best:
            options = []
            for end in range(start + 1, n - (pp - 1 - stage) + 1):
                rest, cuts = solve(stage + 1, end)
                options.append((max(cost(start, end, False), rest), [end] + cuts))
            best[(stage, start)] = min(options, key=lambda o: o[0])
        return best[(stage, start)]

    bounds = [0] + solve(0, 0)[1] + [n]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the TP x PP grid (None-valued groups when a dimension is 1)."""

    tp: int
    pp: int
    rank: int
    tp_rank: int
    stage: int
    tp_group: Any  # this stage's TP ranks (None when tp == 1)
    cpu_group: Any  # gloo group of ranks 0 .. tp*pp - 1, for metadata broadcasts
    group: Any  # the same ranks on the job's backend (NCCL on GPUs), for tensors
    stages: tuple[range, ...]  # layers of every stage
    # PP: the last stage and the first of this TP rank, for the tokens' way back in decode_in_flight
    # (its own NCCL communicator and stream: on the hidden states' one, at p = 2, the two directions'
    # sends and receives would queue behind each other in a cycle)
    back_group: Any = None

    @property
    def layers(self) -> range:
        return self.stages[self.stage]

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    @property
    def prev_rank(self) -> int:
        return self.rank_of(self.stage - 1, self.tp_rank)

    @property
    def next_rank(self) -> int:
        return self.rank_of(self.stage + 1, self.tp_rank)


def make_mesh(rank: int, world_size: int, config: ModelConfig, par: ParallelConfig,
              backend: str, timeout_s: float | None = None) -> Mesh | None:
    """Build the TP groups of ``par`` over ranks ``0 .. tp*pp - 1``; None on ranks left idle.

    Every rank of the job must call this (creating a group is collective), members or not.
    ``timeout_s`` bounds each collective of the new groups: give the job's (``ctx.timeout_s``),
    since a new group does not inherit it - it would wait for a dead or hung peer for the
    backend's default (30 minutes on gloo, 10 on NCCL).
    """
    if par.world_size > world_size:
        raise WorkbenchError(f"{par} needs {par.world_size} ranks; the job has {world_size}")
    check_tp(config, par.tp)
    stages = tuple(balanced_stages(config, par.pp))
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)

    def new_group(members: list[int], backend: str):
        return dist.new_group(members, backend=backend, timeout=timeout)

    tp_group = None
    for stage in range(par.pp):
        members = [stage * par.tp + t for t in range(par.tp)]
        group = new_group(members, backend) if par.tp > 1 else None
        if rank in members:
            tp_group = group
    members = list(range(par.world_size))
    cpu_group = new_group(members, "gloo")
    group = cpu_group if backend == "gloo" else new_group(members, backend)
    back_group = None
    for t in range(par.tp if par.pp > 1 else 0):
        ends = [t, (par.pp - 1) * par.tp + t]  # stage 0 and the last stage of TP rank t
        made = new_group(ends, backend)
        if rank in ends:
            back_group = made
    if rank >= par.world_size:
        return None
    return Mesh(par.tp, par.pp, rank, rank % par.tp, rank // par.tp, tp_group, cpu_group, group,
                stages, back_group)


def alone_mesh(config: ModelConfig, par: ParallelConfig, cpu_group) -> Mesh:
    """TP rank 0 of ``par`` with no peers (``tp_group`` None, so no all-reduce runs): one process
    computes what each rank of the grid computes, its communication left out (``bench tp
    --alone``: TP 2 and 4's compute timed on one GPU)."""
    if par.pp != 1:
        raise WorkbenchError(f"a rank alone is a TP rank (PP 1), got {par}")
    check_tp(config, par.tp)
    return Mesh(par.tp, 1, 0, 0, 0, None, cpu_group, cpu_group,
                (range(config.num_hidden_layers),))
