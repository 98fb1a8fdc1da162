"""Generation on a TP x PP grid of ranks, with the engines of ``workbench.engine`` on top.

Rank 0 is the *driver*: it runs the unchanged static or continuous engine (scheduler, sampling,
traces) on a :class:`DistributedModel`, which looks like a model to the engine. Each call of
it broadcasts the batch metadata (token ids, positions, mask, packed layout) to every rank over
a gloo group, then every rank runs its own part of the forward pass: its TP shard of the layers
of its pipeline stage. The last stage's logits travel back to rank 0, which samples, and the
next step's batch carries the new tokens to everyone. The other ranks are *followers*: they loop
on the broadcasts until the driver says stop. This is the shape of vLLM's multi-GPU executor.

With paged KV storage (``EngineConfig(kv="paged")``) every rank holds the same block pool for its
own heads: the scheduler's block tables travel in the packed layout, and the block moves it orders
between steps (swaps to and from CPU blocks, copy-on-write copies) are recorded on the driver's
pool and replayed by every follower before the next forward, as vLLM's workers apply the
scheduler's ``blocks_to_swap`` / ``blocks_to_copy``. CUDA graphs are not captured across ranks.

Notebooks 04 and 05 use :func:`generate_parallel`; ``torchrun -m workbench generate --tp N``
reaches :func:`generate_worker` through :func:`run_cli_job`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workbench.engine import EngineConfig, EngineRun, Request, SamplingParams
from workbench.errors import WorkbenchError
from workbench.kv.base import KVCache
from workbench.kv.paged import PagedKVCache
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig
from workbench.model.loading import PRESET_PREFIX, resolve_model_dir
from workbench.parallel.launch import DistContext, launch
from workbench.parallel.pipeline import StageEvent, pipeline_forward
from workbench.parallel.plan import (Mesh, ParallelConfig, alone_mesh, balanced_stages, check_tp,
                                     make_mesh, shard_config)
from workbench.parallel.shards import load_shard, random_shard
from workbench.parallel.tensor import build_rank_model
from workbench.parallel.wire import batch_to_wire, kv_from_spec, kv_spec, wire_to_batch

__all__ = ["DistributedModel", "GenerateJob", "RankWorker", "config_of", "generate_parallel",
           "generate_worker", "run_cli_job"]


def config_of(model: str) -> ModelConfig:
    """The full model's config, from a checkpoint directory, ``"bundled"`` or ``"preset:NAME"``."""
    if str(model).startswith(PRESET_PREFIX):
        from workbench.model.presets import preset_config

        return preset_config(str(model).removeprefix(PRESET_PREFIX))
    return ModelConfig.from_file(resolve_model_dir(model) / "config.json")


@dataclass(frozen=True)
class GenerateJob:
    """One generation run: which model, which requests, on which grid, with which engine."""

    model: str
    requests: tuple[Request, ...]
    parallel: ParallelConfig = ParallelConfig()
    strategy: str = "static"  # "static" or "continuous"
    batch_size: int = 8  # static: rows per batch
    engine: EngineConfig = EngineConfig()  # continuous: its limits (kv="contiguous")
    sampling: SamplingParams = SamplingParams()
    dtype: str = "float32"
    progress: bool = False  # a progress bar (requests done) on rank 0

    def __post_init__(self) -> None:
        if self.strategy not in ("static", "continuous"):
            raise WorkbenchError(f"strategy must be 'static' or 'continuous', got {self.strategy!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise WorkbenchError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


# ----------------------------------------------------------------------------- ranks

class RankWorker:
    """One rank's shard of the model and the forward pass it runs each step."""

    def __init__(self, ctx: DistContext, mesh: Mesh, config: ModelConfig, par: ParallelConfig,
                 model, dtype: torch.dtype, bytes_read: int = 0) -> None:
        self.ctx, self.mesh, self.config, self.par, self.model = ctx, mesh, config, par, model
        self.local = shard_config(config, par.tp)
        self.dtype, self.bytes_read = dtype, bytes_read
        self.kv: KVCache | None = None
        self.events: list[StageEvent] = []
        self.step = 0

    @classmethod
    def load(cls, ctx: DistContext, source: str, par: ParallelConfig, dtype: torch.dtype,
             seed: int = 0, alone: bool = False) -> RankWorker | None:
        """Build this rank's shard and read its weights; None on a rank the grid leaves idle.
        ``alone``: TP rank 0's shard in a job of one, with no peers to all-reduce with
        (:func:`~workbench.parallel.plan.alone_mesh`)."""
        config = config_of(source)
        mesh = (alone_mesh(config, par, ctx.cpu_group) if alone
                else make_mesh(ctx.rank, ctx.world_size, config, par, ctx.backend, ctx.timeout_s))
        if mesh is None:
            return None
        model = build_rank_model(config, mesh, par.vocab_parallel, ctx.device, dtype)
        if str(source).startswith(PRESET_PREFIX):
            random_shard(model, seed * 1000 + ctx.rank)
            nbytes = 0
        else:
            nbytes = load_shard(model, resolve_model_dir(source), config, mesh)
        return cls(ctx, mesh, config, par, model, dtype, nbytes)

    def execute(self, batch: ForwardBatch, kv: KVCache | None,
                last_only: bool) -> torch.Tensor | None:
        """Run this rank's part of one forward pass; the logits come out on rank 0 only."""
        mesh = self.mesh
        kind = "prefill" if batch.input_ids.shape[1] > 1 else "decode"
        logits = pipeline_forward(self.model, mesh, batch, kv, self.par.micro_batches,
                                  self.config.hidden_size, self.ctx.device, self.dtype,
                                  last_only, self.step, kind, self.events)
        self.step += 1
        if mesh.pp == 1:
            return logits if mesh.rank == 0 else None
        head = mesh.rank_of(mesh.pp - 1, 0)
        if mesh.rank == head:
            dist.send(logits.contiguous(), dst=0)
        elif mesh.rank == 0:
            B, T = batch.input_ids.shape
            rows = (len(batch.logits_indices),) if batch.logits_indices is not None else (
                (B,) if last_only else (B, T))
            logits = torch.empty(*rows, self.config.vocab_size, device=self.ctx.device,
                                 dtype=self.dtype)
            dist.recv(logits, src=head)
            return logits
        return None

    def broadcast(self, message) -> object:
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.mesh.cpu_group)
        return box[0]

    def follow(self) -> None:
        """Followers: run each forward pass the driver broadcasts, until it sends None."""
        while (message := self.broadcast(None)) is not None:
            wire, spec, last_only, moves = message
            if spec is not None:
                self.kv = kv_from_spec(spec, self.local, self.mesh.layers, self.ctx.device,
                                       self.dtype)
            for name, args in moves:  # the driver's block moves since the last step, in order
                getattr(self.kv, name)(*args)
            self.execute(wire_to_batch(wire, self.ctx.device), self.kv, last_only)


class DistributedModel:
    """What the engine on rank 0 calls as its model: broadcast the batch, run rank 0's part.

    ``config`` is the TP shard's shape, so the engine's KV storage holds this rank's heads;
    ``kv_layers`` its stage's layers, so a paged pool holds only those.
    """

    def __init__(self, worker: RankWorker) -> None:
        self.worker, self.config, self.kv_layers = worker, worker.local, worker.mesh.layers
        self.device, self.dtype = worker.ctx.device, worker.dtype
        self._kv: KVCache | None = None
        self._moves: list = []  # block moves of the driver's pool not yet sent
        self.moves_sent: dict[str, int] = {}  # how many of each kind went to the followers

    def __call__(self, batch: ForwardBatch, kv: KVCache | None = None,
                 last_only: bool = False) -> torch.Tensor:
        spec = None
        if kv is not self._kv:  # a new storage: followers allocate their part of it
            self._kv, spec = kv, kv_spec(kv)
            if isinstance(kv, PagedKVCache):  # its block moves go out with the next batch
                self._moves = kv.move_log = []
        moves, self._moves[:] = list(self._moves), []
        for name, _ in moves:
            self.moves_sent[name] = self.moves_sent.get(name, 0) + 1
        self.worker.broadcast((batch_to_wire(batch), spec, last_only, moves))
        return self.worker.execute(batch, kv, last_only)

    def close(self) -> None:
        self.worker.broadcast(None)


# ----------------------------------------------------------------------------- jobs

def _serve(job: GenerateJob, model: DistributedModel) -> EngineRun:
    from workbench.engine import run_continuous, run_static

    if job.strategy == "continuous":
        return run_continuous(model, list(job.requests), job.engine, job.sampling,
                              progress=job.progress)
    return run_static(model, list(job.requests), job.batch_size, job.sampling,
                      progress=job.progress)


def generate_worker(ctx: DistContext, jobs: list[GenerateJob]) -> list[dict | None]:
    """Run each job on this rank; rank 0 returns, per job, the engine's run, every rank's
    timeline (stage events), stage layers and bytes read, and the paged pool's block moves sent to
    the followers; other ranks return Nones."""
    out: list[dict | None] = []
    for job in jobs:
        worker = RankWorker.load(ctx, job.model, job.parallel, getattr(torch, job.dtype))
        if worker is None:
            out.append(None)  # left idle by this job's grid
            continue
        with torch.inference_mode():
            if ctx.rank == 0:
                model = DistributedModel(worker)
                try:
                    run = _serve(job, model)
                finally:
                    model.close()
                moves = model.moves_sent
            else:
                worker.follow()
        mine = {"rank": ctx.rank, "stage": worker.mesh.stage, "tp_rank": worker.mesh.tp_rank,
                "layers": (worker.mesh.layers.start, worker.mesh.layers.stop),
                "bytes_read": worker.bytes_read, "events": worker.events}
        gathered = [None] * job.parallel.world_size if ctx.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0, group=worker.mesh.cpu_group)
        out.append({"run": run, "ranks": gathered, "block_moves": moves} if ctx.rank == 0
                   else None)
    return out


def _check(job: GenerateJob) -> None:
    """Sizes that cannot work fail here, in one line, before any rank starts."""
    if job.strategy == "continuous" and job.engine.cuda_graphs:
        raise WorkbenchError("cuda_graphs is not supported across ranks: each step's batch is "
                             "broadcast from rank 0 (bench tp --fast times graph-replayed steps)")
    config = config_of(job.model)
    check_tp(config, job.parallel.tp)
    balanced_stages(config, job.parallel.pp)


def generate_parallel(jobs: list[GenerateJob] | GenerateJob, device: str = "cpu",
                      timeout_s: float = 300.0, threads: int = 1,
                      collective_timeout_s: float | None = None) -> list[dict] | dict:
    """Spawn the ranks (as many as the largest grid), run the jobs in order, return rank 0's
    results: one dict per job (``run``: the EngineRun, ``ranks``: each rank's record).
    ``timeout_s`` bounds the whole job (``math.inf``: no bound), ``collective_timeout_s`` each
    collective (default ``timeout_s``): see :func:`~workbench.parallel.launch.launch`."""
    single = isinstance(jobs, GenerateJob)
    jobs = [jobs] if single else list(jobs)
    for job in jobs:
        _check(job)
    world = max(j.parallel.world_size for j in jobs)
    results = launch(generate_worker, world, jobs, device=device, timeout_s=timeout_s,
                     collective_timeout_s=collective_timeout_s, threads=threads)[0]
    return results[0] if single else results


def run_cli_job(job: GenerateJob, device: str, timeout_s: float = 300.0) -> EngineRun | None:
    """``generate --tp/--pp``: inside torchrun, join the job (rank 0 gets the run, others None);
    outside, spawn the ranks on this machine. ``timeout_s`` (``--timeout``) bounds each
    collective, that is how long a rank waits for a dead or hung peer; a job that makes progress
    may run as long as it needs (a real prompt file on a CPU can take hours)."""
    _check(job)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        from workbench.parallel.faults import is_comm_error, tidy_error
        from workbench.parallel.launch import init_distributed, shutdown

        try:
            ctx = init_distributed(device, "auto", timeout_s)
            if ctx.world_size != job.parallel.world_size:
                raise WorkbenchError(f"{job.parallel} needs {job.parallel.world_size} processes; "
                                     f"torchrun started {ctx.world_size}")
            result = generate_worker(ctx, [job])[0]
        except RuntimeError as err:  # a peer died or stopped answering: say so in one line
            if not is_comm_error(err):
                raise
            first = tidy_error(str(err).splitlines()[0]) if str(err) else type(err).__name__
            raise WorkbenchError(f"rank {os.environ['RANK']}: a collective failed - a peer rank died "
                                 f"or did not answer within --timeout {timeout_s:g} s ({first})") from err
        finally:
            shutdown()
        return None if result is None else result["run"]
    return generate_parallel(job, device, math.inf, threads=0, collective_timeout_s=timeout_s)["run"]
