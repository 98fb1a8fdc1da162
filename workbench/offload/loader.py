"""Bring units into fast memory, the next one while the current one computes.

Double buffering in one buffer of fast memory, filled from both ends: unit ``m`` of the load order
goes to the front when ``m`` is even, to the back when odd, so the buffer only needs to hold two
*consecutive* units (``max(size_m + size_m+1)``, not twice the largest: the LM head is much larger
than a layer). While unit ``m`` computes, a loader thread fills the other end with unit ``m + 1``:

    disk  -> pinned staging   a plain memcpy out of the memory-mapped file (page faults read it)
    pinned -> device          ``copy_(non_blocking=True)`` on a separate CUDA stream, so the DMA
                              engine runs beside the compute kernels

CUDA events order it: the copy into a slot waits for the compute that last read the slot, and the
compute waits for its copy. Without ``overlap`` every load runs in the compute stream, in line.
Every span (disk read, copy, compute) can be recorded for the timeline figure. Notebook ``06``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from workbench.offload.memory import staging_bytes
from workbench.offload.store import WeightStore


@dataclass
class Span:
    lane: str  # "disk", "copy" or "compute"
    label: str
    start_s: float
    end_s: float


@dataclass
class Timeline:
    """Spans of work on each lane, in seconds since the run started (CUDA events on a GPU)."""

    device: torch.device
    spans: list[Span] = field(default_factory=list)
    _pending: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        self.base = self._event()

    def _event(self):
        if self.device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def mark(self):
        """A point in time on the current stream (a CUDA event) or the host clock."""
        return self._event() if self.device.type == "cuda" else time.perf_counter() - self.t0

    def add(self, lane: str, label: str, start, end) -> None:
        self._pending.append((lane, label, start, end))

    def add_host(self, lane: str, label: str, start_s: float, end_s: float) -> None:
        self.spans.append(Span(lane, label, start_s - self.t0, end_s - self.t0))

    def resolve(self) -> list[Span]:
        """Turn recorded events into seconds (synchronizes the device)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for lane, label, a, b in self._pending:
            if self.device.type == "cuda":
                a, b = self.base.elapsed_time(a) / 1e3, self.base.elapsed_time(b) / 1e3
            self.spans.append(Span(lane, label, a, b))
        self._pending.clear()
        self.spans.sort(key=lambda s: s.start_s)
        return self.spans


class UnitLoader:
    """Loads the units of ``store`` into slots, in the order a schedule asks for them."""

    def __init__(self, store: WeightStore, overlap: bool, timeline: Timeline | None = None) -> None:
        self.store, self.overlap, self.timeline = store, overlap, timeline
        self.device, cuda = store.device, store.cuda
        loads = [u for u, unit in enumerate(store.units)
                 if unit.kind != "embed" and (store.disk_len[u] if not cuda else store.slot_len[u])]
        n = 2 if overlap else 1
        size = staging_bytes([store.slot_len[u] if cuda else store.disk_len[u] for u in loads],
                             overlap)
        self.buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        disk = max((store.disk_len[u] for u in loads), default=0)
        self.staging = [torch.empty(disk, dtype=torch.uint8, pin_memory=True)
                        for _ in range(n)] if cuda and disk else []
        self.copy_stream = torch.cuda.Stream(self.device) if cuda and overlap else None
        self.freed: list = [None] * n  # CUDA events: compute finished reading the slot
        self.copied: list = [None] * n  # CUDA events: the copy into the slot is done
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="offload-loader") if overlap else None
        self.bytes = {"disk_read": 0, "h2d": 0}

    def _slot(self, u: int, s: int) -> torch.Tensor:
        """Where unit ``u`` goes: the front of the buffer for even loads, the back for odd."""
        n = self.store.slot_len[u] if self.store.cuda else self.store.disk_len[u]
        size = self.buffer.numel()
        return self.buffer[:n] if s == 0 else self.buffer[size - n:]

    def needs_load(self, u: int) -> bool:
        store = self.store
        if store.units[u].kind == "embed":
            return False
        return bool(store.slot_len[u] if store.cuda else store.disk_len[u])

    @torch.inference_mode()  # the slots were made in inference mode; this runs in another thread
    def _load(self, u: int, s: int):
        """Fill slot ``s`` with unit ``u``; returns the CUDA event of its completion (or None)."""
        store, tl = self.store, self.timeline
        disk_n, total = store.disk_len[u], store.slot_len[u]
        name = store.units[u].name
        slot = self._slot(u, s)
        stream = self.copy_stream or (torch.cuda.current_stream(self.device) if store.cuda else None)
        if not store.cuda:
            t0 = time.perf_counter()
            slot[:disk_n].copy_(store.files[u].flat[:disk_n])
            store.files[u].evict()
            if tl is not None:
                tl.add_host("disk", name, t0, time.perf_counter())
            self.bytes["disk_read"] += disk_n
            return None
        with torch.cuda.stream(stream):
            if self.freed[s] is not None:
                stream.wait_event(self.freed[s])
            start = tl.mark() if tl is not None else None
            if disk_n:
                stage = self.staging[s]
                if self.copied[s] is not None:
                    self.copied[s].synchronize()  # the last copy out of this staging buffer
                t0 = time.perf_counter()
                stage[:disk_n].copy_(store.files[u].flat[:disk_n])
                store.files[u].evict()
                if tl is not None:
                    tl.add_host("disk", name, t0, time.perf_counter())
                    start = tl.mark()
                slot[:disk_n].copy_(stage[:disk_n], non_blocking=True)
            if total > disk_n:
                slot[disk_n:total].copy_(store.images[u], non_blocking=True)
            done = torch.cuda.Event(enable_timing=tl is not None)
            done.record(stream)
            if tl is not None:
                tl.add("copy", name, start, done)
        self.copied[s] = done
        self.bytes["disk_read"] += disk_n
        self.bytes["h2d"] += total
        return done

    def stream(self, sequence: list[int]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(unit, weights)`` for each unit of ``sequence``; the caller computes with the
        weights before asking for the next one (its kernels must be queued by then)."""
        load_positions = [p for p, u in enumerate(sequence) if self.needs_load(u)]
        order = {p: m for m, p in enumerate(load_positions)}
        futures: dict[int, Future | object] = {}

        def submit(m: int) -> None:
            if m < len(load_positions) and m not in futures:
                u, s = sequence[load_positions[m]], m % len(self.freed)
                futures[m] = (self.pool.submit(self._load, u, s) if self.pool is not None
                              else self._load(u, s))

        for p, u in enumerate(sequence):
            m = order.get(p)
            if m is None:
                if self.overlap:
                    submit(next((order[q] for q in load_positions if q > p), len(load_positions)))
                yield u, self.store.params_from_slot(u, None)
                continue
            submit(m)
            result = futures.pop(m)
            event = result.result() if isinstance(result, Future) else result
            if self.overlap:
                submit(m + 1)  # the next load runs while this unit computes
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            s = m % len(self.freed)
            yield u, self.store.params_from_slot(u, self._slot(u, s))
            if self.store.cuda:
                freed = torch.cuda.Event()
                freed.record(torch.cuda.current_stream(self.device))
                self.freed[s] = freed

    def close(self) -> None:
        """Stop the loader thread and drop the buffers (their memory returns to the allocator)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.buffer, self.staging = torch.empty(0, dtype=torch.uint8), []
