"""Generation with offloaded weights: the row-by-row and the block (zig-zag) schedules.

The model runs unit by unit (``embed``, ``run_layers(layers=range(i, i + 1))``, ``head``) on weights
the loader brings into fast memory. For ``n`` batches per step the two schedules differ only in the
order of the loops (FlexGen, section 4.1):

    row-by-row (Accelerate, ZeRO-Inference)     block (FlexGen's zig-zag block)
    for step:                                   for step:
        for batch k in 1..n:                        for unit j:          # load unit j once ...
            for unit j:                                 for batch k in 1..n:   # ... use it n times
                load unit j; compute (j, k)                 compute (j, k)

so per step the row schedule moves ``n`` times the offloaded weight bytes, the block schedule once:
with weights streaming at bandwidth ``BW``, a step costs at least ``offloaded bytes / BW`` and the
block schedule's throughput bound is ``n * b * BW / weight bytes`` tokens/s. The block schedule keeps
each batch's hidden states between units (the activation tier) and a KV cache per batch.
Greedy decoding, every row generating exactly ``max_new_tokens`` (FlexGen's benchmark setting).
:func:`schedule_order` is the loop order the executor follows. Taught in notebook ``06_offloading``;
lab 06 (``labs/solutions/lab06_offloading.ipynb``) has the student write :func:`schedule_order`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.attention.masks import padded_causal_mask
from workbench.engine.requests import check_request
from workbench.errors import WorkbenchError
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig
from workbench.model.llama import LlamaModel
from workbench.model.rope import inverse_frequencies
from workbench.offload.kvcache import ActivationStore, TieredKVCache
from workbench.offload.layout import model_weight_bytes
from workbench.offload.loader import Span, Timeline, UnitLoader
from workbench.offload.memory import MemoryPlan, check_policy, cpu_peak_bytes
from workbench.offload.policy import Budget, Policy, act_tiers, kv_tiers
from workbench.offload.store import WeightStore
from workbench.plug import pluggable


@dataclass
class OffloadRun:
    """What one generation run produced and cost."""

    policy: Policy
    output_ids: list[list[int]]  # generated ids of each prompt, in the order given
    prefill_s: float
    decode_s: float
    step_s: list[float]  # wall time of every step (step 0 is the prefill)
    bytes: dict[str, int]  # disk_read, h2d (weights), kv_h2d, kv_d2h, act_moved ...
    plan: MemoryPlan
    peak_fast_bytes: int | None = None  # most fast-tier bytes allocated during the run (below)
    fast_bytes_at_start: int | None = None  # fast-tier bytes allocated when the run began
    peak_reserved_bytes: int | None = None  # CUDA: most bytes the caching allocator reserved
    store_fast_bytes: int | None = None  # of those at start, this model's own weights
    timeline: list = field(default_factory=list)

    @property
    def own_peak_bytes(self) -> int | None:
        """The peak without what *other* objects held on the device (e.g. another model): what
        the plan bounds. Equals ``peak_fast_bytes`` when the run started on a clean device."""
        if self.peak_fast_bytes is None:
            return None
        return self.peak_fast_bytes - self.fast_bytes_at_start + self.store_fast_bytes

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second over the decode steps (every row, steps 1..n-1)."""
        steps = len(self.step_s) - 1
        return self.policy.effective_batch * steps / self.decode_s if steps and self.decode_s else 0.0

    @property
    def output_tok_s(self) -> float:
        """All generated tokens over the whole run, prefill included (FlexGen's throughput)."""
        total = sum(map(len, self.output_ids))
        return total / self.seconds if self.seconds else 0.0


def _bind(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Point the skeleton's parameters at the loaded tensors (no copy)."""
    for name, tensor in params.items():
        path, leaf = name.rsplit(".", 1)
        module.get_submodule(path)._parameters[leaf] = tensor  # plain tensors: inference only


def _unbind(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Forget the tensors of a unit that has computed: a skeleton still pointing at views of the
    staging buffer (or at dequantized copies) would keep that memory alive after the run."""
    for name in params:
        path, leaf = name.rsplit(".", 1)
        module.get_submodule(path)._parameters[leaf] = None


@pluggable("offload.schedule")
def schedule_order(schedule: str, num_units: int, num_batches: int) -> list[tuple[int, list[int]]]:
    """One step of a schedule as the loader and the executor follow it: a list of
    ``(unit, batches)``, each meaning *load unit ``unit``'s weights once, then compute it on each
    of ``batches`` in order*. Row: for each batch, every unit (``num_batches * num_units`` loads);
    block: for each unit, every batch (``num_units`` loads)."""
    if schedule == "block":
        return [(u, list(range(num_batches))) for u in range(num_units)]
    if schedule == "row":
        return [(u, [k]) for k in range(num_batches) for u in range(num_units)]
    raise WorkbenchError(f"schedule must be 'block' or 'row', got {schedule!r}")


class OffloadedModel:
    """A model whose weights live in a :class:`WeightStore`, run under a policy and a budget."""

    def __init__(self, store: WeightStore, budget: Budget) -> None:
        self.store, self.budget, self.config = store, budget, store.config
        self.policy, self.device = store.policy, store.device
        with torch.device("meta"):
            self.skeleton = LlamaModel(self.config)  # module code only: weights are bound per unit
        self.skeleton.inv_freq = inverse_frequencies(self.config).to(self.device)
        self.skeleton.eval()

    @classmethod
    def build(cls, source: LlamaModel | ModelConfig, policy: Policy, budget: Budget,
              device: torch.device | str = "cpu", prompt_len: int = 1, max_new_tokens: int = 1,
              dtype: torch.dtype | None = None, seed: int = 0,
              init_device: str | torch.device = "cpu", cold_disk: bool = True) -> OffloadedModel:
        """Check ``policy`` against ``budget`` for that workload (errors before any work), then
        place the weights: a model's own, or random ones for a :class:`ModelConfig`.
        ``cold_disk=False`` lets disk reads come from the page cache (faster tests)."""
        device = torch.device(device)
        config = source if isinstance(source, ModelConfig) else source.config
        dtype = dtype or (torch.float32 if isinstance(source, ModelConfig) else source.dtype)
        check_policy(policy, config, dtype, budget, device.type, prompt_len, max_new_tokens)
        if isinstance(source, ModelConfig):
            store = WeightStore.random(config, dtype, policy, device, budget.disk_dir, seed,
                                       init_device=init_device, cold_disk=cold_disk)
        else:
            store = WeightStore.from_model(source, policy, device, budget.disk_dir, cold_disk)
        return cls(store, budget)

    @property
    def weight_bytes(self) -> int:
        return model_weight_bytes(self.config, self.store.dtype)

    def close(self) -> None:
        self.store.close()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, policy: Policy | None = None,
                 trace: bool = False, measure_memory: bool = False) -> OffloadRun:
        """Greedy generation for ``policy.effective_batch`` prompts (``num_gpu_batches`` batches of
        ``gpu_batch_size``, in order). ``policy`` may change the batching, schedule and KV/activation
        placement, not the weights' (that is the store's).

        The run's peak fast memory is always measured on CUDA (``max_memory_allocated``); on a CPU
        with ``measure_memory`` (slow: the profiler's memory events), as the store's fast-tier
        tensors plus the most bytes the run allocated on top of them."""
        pol = policy or self.policy
        if (pol.weights, pol.compress_weights) != (self.policy.weights, self.policy.compress_weights):
            raise WorkbenchError("the weights placement is fixed when the model is built: build "
                                 "another OffloadedModel for another weights split")
        if len(prompts) != pol.effective_batch:
            raise WorkbenchError(f"policy {pol.label!r} runs {pol.effective_batch} prompts "
                                 f"({pol.num_gpu_batches} batches of {pol.gpu_batch_size}), "
                                 f"got {len(prompts)}")
        if max_new_tokens < 1:
            raise WorkbenchError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, p in enumerate(prompts):
            check_request(self.config, list(p), max_new_tokens, f"prompt {i}")
        P = max(map(len, prompts))
        plan = check_policy(pol, self.config, self.store.dtype, self.budget, self.device.type,
                            P, max_new_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            run = self._run(pol, prompts, max_new_tokens, plan, trace)
            run.fast_bytes_at_start = start
            run.peak_fast_bytes = torch.cuda.max_memory_allocated(self.device)
            run.peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        elif measure_memory:
            start = self.store.fast_tier_bytes()
            run, extra = cpu_peak_bytes(lambda: self._run(pol, prompts, max_new_tokens, plan, trace))
            run.fast_bytes_at_start, run.peak_fast_bytes = start, start + extra
        else:
            run = self._run(pol, prompts, max_new_tokens, plan, trace)
        run.store_fast_bytes = self.store.fast_tier_bytes()
        return run

    def _run(self, pol: Policy, prompts: list[list[int]], max_new_tokens: int, plan: MemoryPlan,
             trace: bool) -> OffloadRun:
        cuda = self.device.type == "cuda"
        P = max(map(len, prompts))
        counters: dict[str, int] = {}
        timeline = Timeline(self.device) if trace else None
        loader = UnitLoader(self.store, pol.overlap, timeline)
        b, n = pol.gpu_batch_size, pol.num_gpu_batches
        batches = [_Row(prompts[k * b:(k + 1) * b], max_new_tokens, self.device) for k in range(n)]
        disk = (Path(tempfile.mkdtemp(prefix="run-", dir=self.budget.disk_dir))
                if self.budget.disk_dir and pol.uses_disk else None)
        kvs = [TieredKVCache(self.config, b, r.max_len, kv_tiers(pol, self.config.num_hidden_layers),
                             self.device, self.store.dtype, disk, f"kv{k}", pol.cpu_attention,
                             pol.compress_kv, counters) for k, r in enumerate(batches)]
        acts = ActivationStore(act_tiers(pol) if pol.schedule == "block" else ["gpu"] * n,
                               self.device, disk, b * P * self.config.hidden_size
                               * self.store.dtype.itemsize, counters)
        order = schedule_order(pol.schedule, len(self.store.units), n)  # one step's loads
        tasks = [(i == len(order) - 1, u, list(ks)) for _ in range(max_new_tokens)
                 for i, (u, ks) in enumerate(order)]  # (ends its step, unit, batches)
        step_s, t_step = [], time.perf_counter()
        try:
            for (ends_step, u, ks), (_, params) in zip(tasks, loader.stream([t[1] for t in tasks])):
                start = timeline.mark() if timeline is not None else None
                for k in ks:
                    self._compute(u, params, k, batches[k], kvs[k], acts)
                _unbind(self.skeleton, params)
                del params  # before the loader makes the next unit's views (or dense copies)
                if timeline is not None:
                    end = timeline.mark()
                    label = self.store.units[u].name
                    if cuda:
                        timeline.add("compute", label, start, end)
                    else:
                        timeline.spans.append(Span("compute", label, start, end))
                if ends_step:  # the step's last unit of its last batch
                    if cuda:
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    step_s.append(now - t_step)
                    t_step = now
        finally:
            loader.close()
            for kv in kvs:
                kv.close()
            acts.close()
            if disk is not None:
                shutil.rmtree(disk, ignore_errors=True)
        spans = timeline.resolve() if timeline is not None else []
        return OffloadRun(pol, [ids for r in batches for ids in r.outputs], step_s[0],
                          sum(step_s[1:]), step_s, {**loader.bytes, **counters}, plan, timeline=spans)

    def _compute(self, u: int, params: dict[str, torch.Tensor], k: int, row: _Row,
                 kv: TieredKVCache, acts: ActivationStore) -> None:
        unit = self.store.units[u]
        if unit.kind == "embed":
            acts.put(k, self.store.embedding_rows(row.batch.input_ids))  # [B, T, hidden]
            return
        _bind(self.skeleton, params)
        x = acts.get(k)
        if unit.kind == "layer":
            acts.put(k, self.skeleton.run_layers(x, row.batch, kv, layers=range(unit.index,
                                                                                unit.index + 1)))
            return
        logits = self.skeleton.head(x, last_only=True)  # [B, vocab]
        kv.advance(row.batch)
        row.next(logits.argmax(-1).tolist(), kv.length)


class _Row:
    """One batch of left-padded prompts and its decoding state (as the static engine builds it)."""

    def __init__(self, prompts: list[list[int]], steps: int, device: torch.device) -> None:
        P, pad = max(map(len, prompts)), 0
        self.max_len, self.device = P + steps, device
        ids = torch.tensor([[pad] * (P - len(p)) + list(p) for p in prompts], device=device)  # [B, P]
        self.valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts],
                                  device=device)  # [B, P]
        positions = (self.valid.cumsum(1) - 1).clamp(min=0)  # [B, P]
        self.batch = ForwardBatch(ids, positions, padded_causal_mask(self.valid, P))
        self.outputs: list[list[int]] = [[] for _ in prompts]

    def next(self, tokens: list[int], kv_length: int) -> None:
        for out, t in zip(self.outputs, tokens):
            out.append(t)
        B = len(tokens)
        self.valid = torch.cat([self.valid, torch.ones(B, 1, dtype=torch.bool, device=self.device)], 1)
        self.batch = ForwardBatch(input_ids=torch.tensor(tokens, device=self.device)[:, None],  # [B, 1]
                                  positions=self.batch.positions[:, -1:] + 1,
                                  mask=self.valid[:, None, None, :],  # [B, 1, 1, S]
                                  kv_start=kv_length)

