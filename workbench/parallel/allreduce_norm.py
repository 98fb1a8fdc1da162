"""The all-reduce of a tensor-parallel decode step fused with what follows it: the residual add
and the next RMSNorm, in one kernel that also waits for the peers.

A TP layer's row-parallel products (o_proj, down_proj) leave a *partial* sum on every rank; what the
step needs next is never the sum itself but ``residual += sum`` and ``h = RMSNorm(residual)``, the
next product's input. With the one-shot all-reduce (:mod:`workbench.parallel.allreduce`) that is
two kernels and a copy per all-reduce::

    copy partial -> my symmetric buffer ; barrier ; sum the w buffers -> out ; barrier   (one-shot)
    residual += out ; h = norm(residual)                                                (compiled)

Here the product writes its partial sum straight into this rank's symmetric buffer (``torch.mm``
with ``out=``: no copy), and one kernel does the rest::

    program r (row r of the batch):
        write this call's number into my flag for row r in every rank's pad (all at once)
        wait until every rank's flag for row r in my pad holds this call's number (or the next)
        s = buffer_0[r] + ... + buffer_(w-1)[r]   (read over NVLink, summed in float32)
        residual[r] += s (+ bias) ; h[r] = weight * RMSNorm(residual[r])

The second barrier of the one-shot (no rank may overwrite its buffer while a peer still reads it)
is replaced by two buffers used in turn: o_proj writes buffer 0, down_proj buffer 1, the next
o_proj buffer 0 again - only after this rank passed the barrier on buffer 1, which each peer
reaches only once its kernel that read buffer 0 has finished (a stream runs its kernels in order).

The barrier counts calls, as vLLM's custom all-reduce does: the flags are never reset, each holds
the number of the last call its rank reached, so a rank that runs one call ahead (it can be no
more: it waited for this rank) leaves a number that still counts as arrived. One lane per rank
arrives at every rank at once (an exchange with release order at system scope, so the partial sums
written before it are seen by whoever sees the flag) - no round trip to wait for - and the wait
reads this GPU's own pad (volatile loads, then an acquire fence). The number of a call is the
rank's own flag plus one: only this rank writes its own flag, so no counter of its own is kept,
and a CUDA graph replays the count. A peer that never arrives (dead, or stopped) would leave the
kernel spinning forever inside a CUDA graph: the wait is bounded by ``timeout_s`` (read from the
GPU's nanosecond clock), after which the kernel executes ``trap`` - the CUDA context fails, the
host's next synchronization raises, and the rank exits like any rank whose collective failed
(:mod:`workbench.parallel.faults`).

For GPUs (symmetric memory is CUDA's; NVLink multicast stays off). In the tests the same kernel
runs in Triton's interpreter on the CPU: over plain tensors standing for the peers' buffers and
pads, and across TP ranks as CPU processes that map each other's buffers and pads as shared files
(the interpreter's atomics are real ones), where the step gives the plain TP step's
logits (``tests/test_triton_interpreter.py``); and it compiles for sm_90 without a GPU
(``tests/test_triton_compile.py``). Used by :class:`~workbench.engine.fastpath.FusedDecoder`
(``reduce_norm``) and ``bench tp --fused-allreduce``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError
from workbench.parallel.allreduce import check_rank_sum, symmetric_buffer

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: nothing here runs there
    triton = None

__all__ = ["AllReduceAddNorm", "allreduce_add_rms", "reference_add_rms", "stream_ranks"]


if triton is not None:

    @triton.jit
    def _now_ns():
        """The GPU's global nanosecond clock."""
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                         is_pure=False, pack=1)

    @triton.jit
    def _acquire_fence():
        """``fence.acq_rel.sys``: after it, this thread sees what the peers wrote before the flags
        its relaxed loads saw (the PTX memory model's acquire pattern)."""
        tl.inline_asm_elementwise("fence.acq_rel.sys;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _allreduce_add_rms_kernel(Bufs, Pads, Res, W, Bias, H, offset, N, eps, rank, timeout_ns,
                                  WORLD: tl.constexpr, LANES: tl.constexpr, BLOCK: tl.constexpr,
                                  HAS_BIAS: tl.constexpr, ON_GPU: tl.constexpr):
        row = tl.program_id(0)
        t0 = 0
        if ON_GPU:
            t0 = _now_ns()
        lane = tl.arange(0, LANES)  # one lane per rank (LANES: WORLD rounded up to a power of 2)
        live = lane < WORLD
        peer = tl.where(live, lane, 0)
        slot = row * WORLD  # row r's flags, one per rank, in every rank's pad
        flag = slot + rank  # mine: the number of my last call
        mine = tl.load(Pads + rank).to(tl.pointer_type(tl.int32))
        call = tl.load(mine + flag) + 1  # this call's number, the same on every rank
        pads = tl.load(Pads + peer).to(tl.pointer_type(tl.int32))
        # arrive at every rank at once: "my row r of this call is written"
        tl.atomic_xchg(pads + flag, tl.zeros([LANES], tl.int32) + call, mask=live, sem="release",
                       scope="sys")
        waits = mine + slot + peer  # every rank's flag for row r, in my pad
        seen = tl.load(waits, mask=live, other=0, volatile=True)
        # a peer not yet at this call (a difference: the count may wrap around, as int32 does)
        while tl.min(tl.where(live, seen - call, 0), axis=0) < 0:
            if ON_GPU:
                if _now_ns() - t0 > timeout_ns:
                    tl.inline_asm_elementwise("trap;", "=r", [], dtype=tl.int32, is_pure=False,
                                              pack=1)
            seen = tl.load(waits, mask=live, other=0, volatile=True)
        if ON_GPU:
            _acquire_fence()
        tl.debug_barrier()  # the whole program reads only after the flags were seen

        dt = H.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        keep = cols < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):  # the partial sums, every rank's buffer (peers over NVLink)
            buf = tl.load(Bufs + p).to(tl.pointer_type(dt))
            acc += tl.load(buf + offset + row * N + cols, mask=keep, other=0.0,
                           cache_modifier=".cg").to(tl.float32)
        s = acc.to(dt)  # the all-reduced output, rounded as the unfused step's
        if HAS_BIAS:
            s = (s.to(tl.float32) + tl.load(Bias + cols, mask=keep, other=0.0).to(tl.float32)).to(dt)
        r = (tl.load(Res + row * N + cols, mask=keep, other=0.0).to(tl.float32)
             + s.to(tl.float32)).to(dt)
        tl.store(Res + row * N + cols, r, mask=keep)  # the residual stream, in place
        x = r.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        normed = (x * rstd).to(dt)  # RMSNorm as the model computes it (float32, then its dtype)
        w = tl.load(W + cols, mask=keep, other=0.0)
        tl.store(H + row * N + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dt), mask=keep)


def reference_add_rms(partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
                      eps: float, bias: torch.Tensor | None = None):
    """What the kernel computes, in PyTorch: (h, residual + sum) for the partial sums of every
    rank, each [rows, hidden] - the unfused step's all-reduce, bias, residual add and RMSNorm."""
    s = torch.stack([p.float() for p in partials]).sum(0).to(residual.dtype)
    if bias is not None:
        s = s + bias
    r = residual + s
    x = r.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(r.dtype)
    return weight * normed, r


def allreduce_add_rms(bufs: torch.Tensor, pads: torch.Tensor, offset: int, residual: torch.Tensor,
                      weight: torch.Tensor, eps: float, rank: int, bias: torch.Tensor | None = None,
                      timeout_s: float = 60.0) -> torch.Tensor:
    """The kernel, over raw addresses: ``bufs`` [world] int64 - where each rank's buffer starts
    (its partial sums at element ``offset``, [rows, hidden] row-major, ``residual``'s dtype);
    ``pads`` [world] int64 - each rank's signal pad (int32 flags, ``rows x world`` of them, zero
    before the first call; each then holds the number of its rank's last call). ``residual``
    [rows, hidden] is updated in place; returns h [rows, hidden]."""
    if triton is None:
        raise WorkbenchError("the fused all-reduce needs Triton (a GPU install, or the interpreter)")
    rows, n = residual.shape
    world = bufs.numel()
    if pads.numel() != world or not 0 <= rank < world:
        raise WorkbenchError(f"{world} buffers, {pads.numel()} signal pads and rank {rank} "
                             "do not fit")
    if weight.shape != (n,) or bias is not None and bias.shape != (n,):
        raise WorkbenchError(f"weight and bias must be [{n}]")
    if not residual.is_contiguous():
        raise WorkbenchError("the residual stream must be contiguous (it is updated in place)")
    h = torch.empty_like(residual)
    block = triton.next_power_of_2(n)
    _allreduce_add_rms_kernel[(rows,)](  # the interpreter (CPU tensors): no clock, no PTX fence
        bufs, pads, residual, weight, weight if bias is None else bias, h, offset, n, eps, rank,
        int(timeout_s * 1e9), WORLD=world, LANES=triton.next_power_of_2(max(world, 2)),
        BLOCK=block, HAS_BIAS=bias is not None, ON_GPU=residual.is_cuda,
        num_warps=max(1, min(16, block // 512)))
    return h


def stream_ranks(world: int, rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 kernel=allreduce_add_rms) -> tuple[list, list, torch.Tensor, torch.Tensor]:
    """``world`` ranks of the fused all-reduce on ONE device, for checks and timings of its
    barrier with peers (each rank then runs on a stream of its own): ``(buffers, pads, bufs,
    pad_ptrs)`` - every rank's two buffers and its signal pad (zeros), and their addresses for
    ``kernel`` (this module's :func:`allreduce_add_rms`, or another version's). Every rank's
    compiled kernel is loaded here, one call each with every peer already at call 1 (Triton
    specializes rank 1): loading a kernel waits for the GPU to idle, so a rank's first call
    queued behind a rank spinning for it would wait forever. The pads are zero again after."""
    buffers = [torch.zeros(2 * rows * hidden, dtype=dtype, device=device) for _ in range(world)]
    pads = [torch.zeros(rows * world, dtype=torch.int32, device=device) for _ in range(world)]
    bufs, pad_ptrs = (torch.tensor([t.data_ptr() for t in ts], device=device)
                      for ts in (buffers, pads))
    ones = torch.ones(hidden, dtype=dtype, device=device)
    for r in range(world):
        pads[r].view(rows, world)[:, :] = 1
        pads[r].view(rows, world)[:, r] = 0
        kernel(bufs, pad_ptrs, 0, torch.zeros(rows, hidden, dtype=dtype, device=device), ones,
               1e-5, r)  # waits on pads[r] only, set just above
    for pad in pads:
        pad.zero_()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # before any other stream uses the pads
    return buffers, pads, bufs, pad_ptrs


class AllReduceAddNorm:
    """``h, residual = reduce_norm(residual, weight, eps, bias)`` after a row-parallel product
    wrote its partial sum into ``reduce_norm.partial(rows)``: the sum over ``group`` plus the bias,
    added to the residual stream (in place), and the next RMSNorm of it - one kernel, barrier
    included (module docstring). A collective call: every rank of ``group`` makes one. ``group``
    None: a rank alone, its buffers plain memory (no peer: the kernel's own cost, and the CPU
    tests in Triton's interpreter). Calls alternate between two buffers; a step must make an
    even number of them (a Llama step makes two per layer), and :meth:`begin` starts each step
    on the first buffer."""

    def __init__(self, group, max_rows: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, timeout_s: float = 60.0) -> None:
        interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        if triton is None or not (device.type == "cuda" or interpreted):
            raise WorkbenchError("the fused all-reduce uses symmetric memory and Triton, which "
                                 f"need CUDA GPUs (this rank runs on {device.type})")
        self.hidden, self.max_rows, self.timeout_s, self.phase = hidden, max_rows, timeout_s, 0
        numel = 2 * max_rows * hidden
        if group is None:  # a rank alone: plain memory, the same kernel (and the interpreter's)
            self.world, self.rank = 1, 0
            self.buffer = torch.empty(numel, dtype=dtype, device=device)
            self._pad = torch.zeros(max_rows, dtype=torch.int32, device=device)
            addresses = [self.buffer.data_ptr()], [self._pad.data_ptr()]
        elif interpreted:  # CPU ranks (tests): files that every rank maps stand for NVLink
            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
            addresses = self._map_shared_files(group, numel, dtype)
        else:
            import torch.distributed._symmetric_memory as symm_mem

            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
            pad_bytes = getattr(symm_mem, "get_signal_pad_size", lambda: 2048)()
            if max_rows * self.world * 4 > pad_bytes:
                raise WorkbenchError(f"{max_rows} rows x {self.world} ranks of flags do not fit "
                                     f"the signal pad ({pad_bytes} bytes)")
            self.buffer, handle = symmetric_buffer(group, numel, dtype, device)
            addresses = handle.buffer_ptrs, handle.signal_pad_ptrs
        self.bufs, self.pads = (torch.tensor(a, dtype=torch.int64, device=device) for a in addresses)
        self._check()

    def _map_shared_files(self, group, numel: int, dtype: torch.dtype):
        """Symmetric memory for CPU processes: each rank's buffer and pad is a file (zeros) that
        every rank maps shared, so its writes are every peer's reads and its atomic exchanges
        (the interpreter's are real atomics) every peer's flags. The files are removed once all
        ranks hold their mappings."""
        import shutil
        import tempfile

        where = [tempfile.mkdtemp(prefix="workbench-allreduce-") if self.rank == 0 else None]
        dist.broadcast_object_list(where, src=dist.get_global_rank(group, 0), group=group)

        def mapped(rank: int) -> tuple[torch.Tensor, torch.Tensor]:  # (buffer, pad) of a rank
            file = lambda kind: os.path.join(where[0], f"{kind}{rank}")  # noqa: E731
            return (torch.from_file(file("buffer"), shared=True, size=numel, dtype=dtype),
                    torch.from_file(file("pad"), shared=True, size=self.max_rows * self.world,
                                    dtype=torch.int32))

        self.buffer, self._pad = mapped(self.rank)  # made here, zeros
        dist.barrier(group=group)  # every rank's files made
        self._maps = [(self.buffer, self._pad) if r == self.rank else mapped(r)
                      for r in range(self.world)]
        dist.barrier(group=group)  # every file mapped everywhere
        if self.rank == 0:
            shutil.rmtree(where[0], ignore_errors=True)
        return [b.data_ptr() for b, _ in self._maps], [p.data_ptr() for _, p in self._maps]

    def begin(self) -> None:
        """Start a step on the first buffer (so that a captured step replays the same order)."""
        self.phase = 0

    def partial(self, rows: int) -> torch.Tensor:
        """[rows, hidden]: where this rank's row-parallel product writes its partial sum next."""
        if rows > self.max_rows:
            raise WorkbenchError(f"{rows} rows; the symmetric buffers hold {self.max_rows}")
        start = self.phase * self.max_rows * self.hidden
        return self.buffer[start:start + rows * self.hidden].view(rows, self.hidden)

    def __call__(self, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 bias: torch.Tensor | None = None):
        """(h, residual): see the class; ``residual`` [rows, hidden] is updated in place."""
        offset = self.phase * self.max_rows * self.hidden
        self.phase ^= 1
        return allreduce_add_rms(self.bufs, self.pads, offset, residual, weight, eps, self.rank,
                                 bias, self.timeout_s), residual

    def _check(self) -> None:
        """One call on each buffer, eagerly, before anyone times or captures it (back on the
        first buffer after): rank r's partial sums are r + 1 everywhere, the residual zero and
        the weight one, so the residual must hold the sum of the ranks'
        (:func:`~workbench.parallel.allreduce.check_rank_sum`)."""
        rows, like = min(self.max_rows, 2), dict(dtype=self.buffer.dtype, device=self.buffer.device)
        ones = torch.ones(self.hidden, **like)
        self.begin()
        for _ in range(2):
            self.partial(rows).fill_(self.rank + 1)
            residual = torch.zeros(rows, self.hidden, **like)
            self(residual, ones, 1e-6)
            check_rank_sum(residual, self.world, self.rank, "the fused all-reduce")
