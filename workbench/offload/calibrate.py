"""Measure the cost model's parameters on this machine, automatically (notebook ``06``).

* bandwidths: cold disk reads of memory-mapped files, pinned host-to-device copies, RAM copies, and
  4-bit dequantization;
* unit calls: the engine's own decoder-layer call and head call (LM head, argmax, its sync, and the
  next token's embedding), timed back to back on a one-layer copy of the model with its weights
  resident, at 1 and ``rows`` rows: ``t(b) = a + c b`` through the two points;
* ``s0``: a whole decode step of that one-layer model minus its layer and head calls;
* ``f``: the same layer calls run while a load (a cold disk read on a CPU, a pinned copy on a side
  stream on a GPU) runs in another thread, as the loader does: ``f = hidden / min(load, calls)``.

Every timing repeats its work after a warm-up with the same shapes (first calls at a new shape can
be much slower) and takes the median. :func:`calibrate_with_probes` then fits ``a``, ``c``, ``s0``
and ``f`` (:mod:`workbench.offload.fit`) to six short real runs of a 4-layer copy of the model,
streaming its weights or not: what the micro-benchmarks miss (the loader thread beside the compute,
synchronizations) is in those runs. ``bench offload`` and notebook ``06`` use that.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from workbench.model.config import ModelConfig
from workbench.offload.cost import Calibration
from workbench.offload.layout import _itemsize, weight_units
from workbench.offload.store import DiskFile


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


def measure_overlap(device: torch.device, disk_dir: str | Path, work, load_bytes: int) -> float:
    """f in [0, 1]: how much of the shorter of (a load, ``work()``) hides behind the longer when
    both run at once: a cold disk read on a CPU, a pinned host-to-device copy on a GPU."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        src = torch.ones(load_bytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(load_bytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device)

        @torch.inference_mode()  # runs in a worker thread too: tensors may be inference tensors
        def load():
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            stream.synchronize()
    else:
        gen = torch.Generator().manual_seed(1)
        f = DiskFile(Path(disk_dir) / "overlap.bin",
                     torch.randint(0, 255, (load_bytes,), dtype=torch.uint8, generator=gen))
        buf = torch.empty(load_bytes, dtype=torch.uint8)

        @torch.inference_mode()
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


class _UnitBench:
    """A one-layer, all-resident copy of the model in its decode state, for timing unit calls."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 rows: int, context: int, head_calls: int, seed: int = 0) -> None:
        from workbench.offload.kvcache import ActivationStore, TieredKVCache
        from workbench.offload.policy import Budget, Policy
        from workbench.offload.schedule import OffloadedModel, _Row

        small = replace(config, num_hidden_layers=1)
        self.om = OffloadedModel.build(small, Policy(gpu_batch_size=rows), Budget(1 << 62), device,
                                       context, 2, dtype, seed, init_device=device)
        gen = torch.Generator().manual_seed(seed)
        self.prompts = torch.randint(1, config.vocab_size, (rows, context), generator=gen).tolist()
        self.row = _Row(self.prompts, head_calls + 4, device)  # a head call advances one token
        self.kv = TieredKVCache(small, rows, self.row.max_len, ["gpu"], device, dtype)
        self.acts = ActivationStore(["gpu"], device, None, 0)
        self.params = [self.om.store.params_from_slot(u, None) for u in range(3)]
        for u in (0, 1, 2, 0):  # prefill (embed, layer, head), then embed the first new token
            self.call(u)

    def call(self, u: int) -> None:
        self.om._compute(u, self.params[u], 0, self.row, self.kv, self.acts)

    def close(self) -> None:
        from workbench.offload.schedule import _unbind

        for p in self.params:
            _unbind(self.om.skeleton, p)
        self.om.close()


def unit_times(config: ModelConfig, dtype: torch.dtype, device: torch.device, rows: int,
               context: int = 16, calls: int = 8, repeats: int = 3) -> dict[str, float]:
    """Seconds of one decoder-layer call, one head call (+ the next embedding) and one whole
    decode step, for ``rows`` rows after ``context`` tokens, our engine, weights resident."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    bench = _UnitBench(config, dtype, device, rows, context, calls * (repeats + 1))  # head calls
    try:
        def layers():
            for _ in range(calls):
                bench.call(1)

        def heads():
            for _ in range(calls):
                bench.call(2)
                bench.call(0)
        layer = _median(layers, repeats, sync) / calls
        head = _median(heads, repeats, sync) / calls
        om, steps = bench.om, 2 + calls // 2
        om.generate(bench.prompts, steps)  # warm-up at the same shapes
        run = om.generate(bench.prompts, steps)
        step = statistics.median(run.step_s[1:])
    finally:
        bench.close()
    return {"layer_s": layer, "head_s": head, "step_s": step}


def _layer_work(config: ModelConfig, dtype: torch.dtype, device: torch.device, rows: int,
                seconds: float, per_call: float):
    """A ``work()`` of real layer calls lasting about ``seconds`` (for the overlap measurement)."""
    calls = max(1, min(400, round(seconds / max(per_call, 1e-6))))
    bench = _UnitBench(config, dtype, device, rows, 16, 0)

    def work():
        for _ in range(calls):
            bench.call(1)
    return bench, work


def calibrate(config: ModelConfig, dtype: torch.dtype, device: torch.device, disk_dir: str | Path,
              rows: int = 8, context: int = 16, quick: bool = False) -> Calibration:
    """Measure every parameter :func:`~workbench.offload.cost.predict` needs (module docstring)."""
    from workbench.offload.store import QUANT
    from workbench.quant.groupwise import quantize

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    repeats = 3 if quick else 5
    with torch.inference_mode():
        one = unit_times(config, dtype, device, 1, context, repeats=repeats)
        many = unit_times(config, dtype, device, rows, context, repeats=repeats)
        layer_token = max((many["layer_s"] - one["layer_s"]) / (rows - 1), 1e-12)
        head_token = max((many["head_s"] - one["head_s"]) / (rows - 1), 1e-12)
        step_fixed = max(0.0, statistics.median(
            t["step_s"] - t["layer_s"] - t["head_s"] for t in (one, many)))
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(1024, 1024, generator=gen, device=device).to(dtype)
        q = quantize(w, QUANT)
        dq = _median(lambda: q.dequantize(dtype), 3 if quick else 7, sync)
    layer_bytes = weight_units(config)[1].nbytes(dtype)
    load = min(max(layer_bytes, 1 << 20), 256 << 20)
    disk = measure_disk_read(disk_dir, load, files=2 if quick else 4)
    h2d = measure_h2d(device)
    t_load = load / (h2d if device.type == "cuda" else disk)
    with torch.inference_mode():
        bench, work = _layer_work(config, dtype, device, rows, t_load, many["layer_s"])
        try:
            overlap = measure_overlap(device, disk_dir, work, load)
        finally:
            bench.close()
    host = torch.empty(64 << 20, dtype=torch.uint8)
    host_bw = (64 << 20) / _median(lambda: host.clone(), 3, lambda: None)
    return Calibration(device.type, disk, h2d, host_bw,
                       layer_fixed_s=max(one["layer_s"] - layer_token, 1e-7),
                       layer_token_s=layer_token,
                       head_fixed_s=max(one["head_s"] - head_token, 1e-7), head_token_s=head_token,
                       dequant_Bps=w.numel() * _itemsize(dtype) / dq, overlap=overlap,
                       step_fixed_s=step_fixed, source="measured")


def probe_runs(config: ModelConfig, dtype: torch.dtype, device: torch.device,
               disk_dir: str | Path, weights, rows: int = 8, context: int = 16, gen: int = 4,
               layers: int = 4, quick: bool = False) -> tuple[ModelConfig, list[dict]]:
    """Short real runs of a ``layers``-layer copy of the model, each warmed up at its shapes
    first: with the weights split ``weights`` (block schedule at 1x1, ``rows``x1, ``rows``x8 and
    4``rows``x8; ``rows``x4 and 2``rows``x4 when ``quick``), and with every weight resident (1x1
    and the middle batching: compute alone, nothing to hide it). The rows
    :func:`~workbench.offload.fit.fit_calibration` fits the model to; they hold what
    micro-benchmarks miss: the loader thread beside the compute, synchronizations, copies."""
    from workbench.offload.policy import Budget, Split

    small = replace(config, num_hidden_layers=min(layers, config.num_hidden_layers))
    big = ((rows, 4), (2 * rows, 4)) if quick else ((rows, 8), (4 * rows, 8))
    resident = Split(100, 0, 0, what="weights")
    out: list[dict] = []
    for split, batchings in ((weights, ((1, 1), (rows, 1), *big)), (resident, ((1, 1), big[0]))):
        if split == resident and weights == resident:
            break
        _probe(small, dtype, device, Budget(1 << 62, disk_dir), split, batchings, context, gen,
               out)
    return small, out


def _probe(small: ModelConfig, dtype, device, budget, split, batchings, context: int, gen: int,
           out: list[dict]) -> None:
    from workbench.offload.policy import Policy
    from workbench.offload.schedule import OffloadedModel

    om = OffloadedModel.build(small, Policy(weights=split), budget, device, context, gen, dtype,
                              init_device=device)
    rng = torch.Generator().manual_seed(3)
    try:
        for b, n in batchings:
            policy = Policy(weights=split, gpu_batch_size=b, num_gpu_batches=n)
            prompts = torch.randint(1, small.vocab_size, (b * n, context), generator=rng).tolist()
            om.generate(prompts, gen, policy)  # warm-up at these shapes
            run = om.generate(prompts, gen, policy)
            out.append({"policy": policy.label, "schedule": "block", "gpu_batch_size": b,
                        "num_gpu_batches": n, "weights": [split.gpu, split.cpu, split.disk],
                        "kv": [100.0, 0.0, 0.0], "decode_step_s": run.decode_s / (gen - 1),
                        "decode_step_median_s": statistics.median(run.step_s[1:])})
    finally:
        om.close()


def calibrate_with_probes(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                          disk_dir: str | Path, weights, rows: int = 8, context: int = 16,
                          quick: bool = False, probes: bool = True) -> tuple[Calibration, dict]:
    """:func:`calibrate`, then the layer call ``a``, its per-row cost ``c``, the step overhead
    ``s0`` and the overlap ``f`` fitted to :func:`probe_runs` (the bandwidths stay as measured).
    Returns the fitted calibration and the details (micro-benchmarks, probe rows, fit errors);
    ``probes=False`` (quick checks) returns the micro-benchmarks' calibration."""
    from workbench.offload.fit import FREE, fit_calibration

    device = torch.device(device)
    micro = calibrate(config, dtype, device, disk_dir, rows, context, quick)
    if not probes:
        return micro, {"microbenchmarks": micro.to_dict(), "probes": [], "probe_fit_errors": [],
                       "probe_stalled": []}
    small, rows_ = probe_runs(config, dtype, device, disk_dir, weights, rows, context,
                              gen=3 if quick else 4, quick=quick)
    fit = fit_calibration(rows_, micro, small, dtype, context, 3 if quick else 4,
                          FREE + ("overlap",))
    cal = replace(fit.calibration, source="probes")
    return cal, {"microbenchmarks": micro.to_dict(), "probes": rows_,
                 "probe_fit_errors": fit.errors, "probe_stalled": list(fit.excluded)}
