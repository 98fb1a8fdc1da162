"""A cost model of offloaded generation, and a search of the policy space with it.

Per step, every unit ``j`` has a load time and a compute time (FlexGen, section 4.2):

    load_j    = disk_j / BW_disk + h2d_j / BW_h2d         (the bytes the unit's slot moves)
    comp_jk   = a + c * tokens_k  (+ KV traffic)           (batch k; a, c measured on one layer)

and the schedule composes them, overlapping loads with compute where the loader does:

    block:  step = sum_j  o(load_j, sum_k comp_jk)         row:  step = sum_k sum_j o(load_j, comp_jk)
    o(l, c) = max(l, c) + (1 - f) min(l, c)                (f = 1: perfect overlap; no overlap: l + c)

``a`` and ``c`` come from timing our own engine's decode steps, weights resident, on 1- and 2-layer
models of this shape at two batch sizes (so the engine's per-unit overheads count):
``c = 1 / (achieved FLOP/s per layer-token)``, ``a`` the fixed cost of a unit. ``f``, the share of
the shorter of load and compute that hides behind the longer, is measured by running a disk read (or
a host-to-device copy) beside a layer's compute: about 1 on a GPU (copy engine), less on a CPU whose
cores are shared. The bandwidths are measured on this machine too (:func:`calibrate`). :func:`search` ranks every policy of a grid that
fits the budget by predicted throughput (exhaustive search, FlexGen solves an LP over the same
terms). Notebook ``06_offloading`` plots predicted against measured.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.offload.layout import _itemsize, weight_units
from workbench.offload.policy import Budget, Policy, Split, kv_tiers, plan_memory
from workbench.offload.store import DiskFile, unit_layout


@dataclass(frozen=True)
class Calibration:
    """Measured speeds of this machine for one model shape and dtype."""

    device_type: str
    disk_Bps: float  # cold reads of a memory-mapped file into RAM
    h2d_Bps: float  # pinned host -> device copies (inf on a CPU: nothing is copied)
    host_Bps: float  # RAM copy bandwidth (KV cache read by CPU attention)
    layer_fixed_s: float  # one decoder layer call, weights resident: a
    layer_token_s: float  # ... plus this per token: c
    head_fixed_s: float
    head_token_s: float
    dequant_Bps: float  # dense bytes per second out of 4-bit dequantization
    overlap: float = 1.0  # f: share of min(load, compute) hidden behind the other when overlapping

    def layer_flop_rate(self, config: ModelConfig) -> float:
        """Achieved FLOP/s of a decoder layer: 2 * layer params per token / c."""
        return 2 * _layer_params(config) / self.layer_token_s


def _layer_params(config: ModelConfig) -> int:
    return sum(p.numel for p in weight_units(config)[1].params)


@dataclass(frozen=True)
class Prediction:
    policy: Policy
    prefill_s: float
    decode_step_s: float  # one decode step, all batches
    gen_len: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + (self.gen_len - 1) * self.decode_step_s

    @property
    def decode_tok_s(self) -> float:
        return self.policy.effective_batch / self.decode_step_s

    @property
    def per_token_s(self) -> float:
        """Decode time per generated token (the number compared with the measured one)."""
        return self.decode_step_s / self.policy.effective_batch


def predict(policy: Policy, config: ModelConfig, dtype: torch.dtype, cal: Calibration,
            prompt_len: int, gen_len: int) -> Prediction:
    """Predicted prefill and decode-step times of ``policy`` for prompts of ``prompt_len``."""
    items, disk_len, slot_len = unit_layout(config, dtype, policy.weights, policy.compress_weights)
    units, cuda = weight_units(config), cal.device_type == "cuda"
    kv_layer_token = 2 * config.num_key_value_heads * config.head_dim * _itemsize(dtype)
    kv_tier = kv_tiers(policy, config.num_hidden_layers)
    b, n = policy.gpu_batch_size, policy.num_gpu_batches

    def step(tokens: int, context: int) -> float:
        total = 0.0
        for j, unit in enumerate(units):
            if unit.kind == "embed":
                continue
            load = disk_len[j] / cal.disk_Bps + (slot_len[j] / cal.h2d_Bps if cuda else 0.0)
            dense = sum(it.param.numel * _itemsize(dtype) for it in items[j] if it.part == "codes")
            dequant = dense / cal.dequant_Bps
            if unit.kind == "head":
                comp = cal.head_fixed_s + cal.head_token_s * b + dequant
            else:
                comp = cal.layer_fixed_s + cal.layer_token_s * b * tokens + dequant
                kv_bytes = kv_layer_token * b * context
                if kv_tier[unit.index] != "gpu" and cuda:
                    comp += (kv_bytes / cal.host_Bps if policy.cpu_attention
                             else kv_bytes / cal.h2d_Bps)
            f = cal.overlap if policy.overlap else 0.0
            if policy.schedule == "block":
                total += max(load, n * comp) + (1 - f) * min(load, n * comp)
            else:
                total += n * (max(load, comp) + (1 - f) * min(load, comp))
        return total

    return Prediction(policy, step(prompt_len, prompt_len), step(1, prompt_len + gen_len // 2),
                      gen_len)


@dataclass(frozen=True)
class SearchSpace:
    """The grid :func:`search` walks: percentages in steps of ``step``, and these batchings."""

    step: int = 10
    gpu_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_gpu_batches: tuple[int, ...] = (1, 2, 4, 8)
    schedules: tuple[str, ...] = ("block", "row")
    kv: tuple[Split, ...] = (Split(what="KV cache"), Split(0, 100, 0, what="KV cache"))
    cpu_attention: tuple[bool, ...] = (False, True)
    use_disk: bool = True  # also consider weights on disk

    def policies(self, device_type: str):
        shares = range(0, 101, self.step)
        for g in shares:
            for c in (shares if device_type == "cuda" else (0,)):  # on a CPU, cpu tier == RAM
                if g + c > 100 or (not self.use_disk and g + c < 100):
                    continue
                weights = Split(g, c, 100 - g - c, what="weights")
                for b, n, sched, kv, attn in itertools.product(
                        self.gpu_batch_sizes, self.num_gpu_batches, self.schedules, self.kv,
                        self.cpu_attention):
                    if attn and (kv.gpu == 100 or device_type != "cuda"):
                        continue
                    if sched == "row" and n == 1:
                        continue  # with one batch the two schedules are the same
                    yield Policy(weights=weights, kv=kv, gpu_batch_size=b, num_gpu_batches=n,
                                 schedule=sched, cpu_attention=attn)


def search(config: ModelConfig, dtype: torch.dtype, cal: Calibration, budget: Budget,
           prompt_len: int, gen_len: int, space: SearchSpace = SearchSpace()) -> list[Prediction]:
    """Every policy of ``space`` that fits ``budget``, best predicted decode throughput first."""
    out = []
    for policy in space.policies(cal.device_type):
        plan = plan_memory(policy, config, dtype, cal.device_type, prompt_len, gen_len)
        if plan.fast_total <= budget.fast_bytes:
            out.append(predict(policy, config, dtype, cal, prompt_len, gen_len))
    if not out:
        raise WorkbenchError(f"no policy of the grid fits a budget of {budget.fast_bytes} bytes")
    return sorted(out, key=lambda p: -p.decode_tok_s)


# ---- measurements ---------------------------------------------------------------------------------
def _median(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_disk_read(disk_dir: str | Path, nbytes: int = 64 << 20, files: int = 4,
                      repeats: int = 2) -> float:
    """Bytes/s of cold reads: copy memory-mapped files of ``nbytes`` (evicted from the page cache
    after every read, as the store does) into RAM, one after the other."""
    gen = torch.Generator().manual_seed(0)
    handles = [DiskFile(Path(disk_dir) / f"calibration-{i}.bin",
                        torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=gen), cold=True)
               for i in range(files)]
    out = torch.empty(nbytes, dtype=torch.uint8)
    try:
        def read():
            for f in handles:
                out.copy_(f.flat)
                f.evict()
        seconds = _median(read, repeats, lambda: None)
    finally:
        for f in handles:
            f.close()
            f.path.unlink(missing_ok=True)
    return files * nbytes / seconds


def measure_h2d(device: torch.device, nbytes: int = 256 << 20, pinned: bool = True,
                repeats: int = 5) -> float:
    """Bytes/s of host -> device copies from pinned (or pageable) memory."""
    if device.type != "cuda":
        return float("inf")
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / _median(lambda: dst.copy_(src, non_blocking=pinned), repeats,
                            lambda: torch.cuda.synchronize(device))


def _engine_step(config: ModelConfig, layers: int, rows: int, dtype: torch.dtype,
                 device: torch.device, context: int, steps: int) -> float:
    """Median decode-step time of our engine on a ``layers``-layer model of this shape, all
    weights resident, ``rows`` rows after ``context`` prompt tokens."""
    from workbench.offload.policy import Budget
    from workbench.offload.schedule import OffloadedModel

    small = replace(config, num_hidden_layers=layers)
    om = OffloadedModel.build(small, Policy(gpu_batch_size=rows), Budget(1 << 62), device, context,
                              steps + 1, dtype, init_device=device)
    gen = torch.Generator().manual_seed(layers)
    prompts = torch.randint(1, config.vocab_size, (rows, context), generator=gen).tolist()
    om.generate(prompts, 2)  # warm-up
    run = om.generate(prompts, steps + 1)
    om.close()
    return statistics.median(run.step_s[1:])


def measure_overlap(device: torch.device, disk_dir: str | Path, work, load_bytes: int) -> float:
    """f in [0, 1]: how much of the shorter of (a load, ``work()``) hides behind the longer when
    both run at once: a cold disk read on a CPU, a pinned host-to-device copy on a GPU."""
    from concurrent.futures import ThreadPoolExecutor

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        src = torch.ones(load_bytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(load_bytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device)

        def load():
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            stream.synchronize()
    else:
        gen = torch.Generator().manual_seed(1)
        f = DiskFile(Path(disk_dir) / "overlap.bin",
                     torch.randint(0, 255, (load_bytes,), dtype=torch.uint8, generator=gen))
        buf = torch.empty(load_bytes, dtype=torch.uint8)

        def load():
            buf.copy_(f.flat)
            f.evict()
    try:
        t_load = _median(load, 3, sync)
        t_work = _median(work, 3, sync)
        with ThreadPoolExecutor(1) as pool:
            def both():
                fut = pool.submit(load)
                work()
                fut.result()
            t_both = _median(both, 3, sync)
    finally:
        if not cuda:
            f.close()
            f.path.unlink(missing_ok=True)
    hidden = t_load + t_work - t_both
    return min(1.0, max(0.0, hidden / min(t_load, t_work)))


def calibrate(config: ModelConfig, dtype: torch.dtype, device: torch.device, disk_dir: str | Path,
              rows: int = 8, context: int = 16, quick: bool = False) -> Calibration:
    """Measure the speeds :func:`predict` needs: disk and host-to-device bandwidth, the engine's
    per-layer and head cost at 1 and ``rows`` rows (decode after ``context`` tokens), the
    dequantization speed and the load/compute overlap. Seconds; ``quick`` is noisier."""
    from workbench.offload.store import QUANT
    from workbench.quant.groupwise import quantize

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    steps = 4 if quick else 8
    per_layer, head = {}, {}
    with torch.inference_mode():
        for n in (1, rows):
            one = _engine_step(config, 1, n, dtype, device, context, steps)
            two = _engine_step(config, 2, n, dtype, device, context, steps)
            per_layer[n] = max(two - one, 1e-7)
            head[n] = max(one - per_layer[n], 1e-7)  # embedding + head + per-step work
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(1024, 1024, generator=gen, device=device).to(dtype)
        q = quantize(w, QUANT)
        dq = _median(lambda: q.dequantize(dtype), 3 if quick else 7, sync)
        x = torch.randn(rows, 1024, generator=gen, device=device).to(dtype)
        reps = max(1, int(per_layer[rows] / max(_median(lambda: x @ w, 3, sync), 1e-9)))

        def work():  # about one layer's compute, as matmuls
            for _ in range(reps):
                x @ w
    layer_bytes = weight_units(config)[1].nbytes(dtype)
    load = min(max(layer_bytes, 1 << 20), 256 << 20)
    disk = measure_disk_read(disk_dir, load, files=2 if quick else 4)
    overlap = measure_overlap(device, disk_dir, work, load)
    host = torch.empty(64 << 20, dtype=torch.uint8)
    host_bw = (64 << 20) / _median(lambda: host.clone(), 3, lambda: None)
    return Calibration(device.type, disk, measure_h2d(device), host_bw,
                       layer_fixed_s=per_layer[1],
                       layer_token_s=max((per_layer[rows] - per_layer[1]) / (rows - 1), 1e-12),
                       head_fixed_s=head[1],
                       head_token_s=max((head[rows] - head[1]) / (rows - 1), 1e-12),
                       dequant_Bps=w.numel() * _itemsize(dtype) / dq, overlap=overlap)


def with_bandwidths(cal: Calibration, **changes: float) -> Calibration:
    """A copy with some speeds replaced (what-if questions in the notebook)."""
    return replace(cal, **changes)
