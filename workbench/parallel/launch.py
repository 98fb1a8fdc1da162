"""Start the ranks of a ``torch.distributed`` job, from ``torchrun`` or from Python, and end them safely.

Two ways in, one context out (:class:`DistContext`):

* under ``torchrun`` (one process per rank, on one node or many), each process calls
  :func:`init_distributed`, which reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
  and ``MASTER_PORT`` from the environment torchrun set;
* from a notebook or a test, :func:`launch` spawns ``world_size`` processes on this machine,
  runs ``fn(ctx, *args)`` in each and returns the list of their results, rank by rank.

Nothing may hang. Every collective has the process group's timeout; :func:`launch` watches the
ranks, and as soon as one fails, dies or the whole job passes ``timeout_s``, it kills every rank
and raises a one-line :class:`~workbench.errors.WorkbenchError` that names the rank and the cause.
Children also die with their parent (``PR_SET_PDEATHSIG`` on Linux), so no process is left
behind. Teardown (``destroy_process_group``) runs under a timeout too: the facts of issue 5 saw
it hang after a CUDA graph captured an all-reduce. Taught in notebooks 04 and 05.
"""

from __future__ import annotations

import ctypes
import datetime
import math
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError
from workbench.parallel.faults import is_comm_error, tidy_error
from workbench.parallel.plugins import installed, pack_active

__all__ = ["DistContext", "free_port", "in_sequence", "init_distributed", "launch", "shutdown"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: its rank, the device it drives, the groups it talks in.

    ``cpu_group`` is a gloo group over every rank, for small metadata (batch descriptions,
    Python objects) even when the tensors travel over NCCL, as vLLM does.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" (CPU) or "nccl" (CUDA)
    device: torch.device
    cpu_group: Any
    timeout_s: float

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler and sampling; the others follow its broadcasts."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free right now (the OS picks it), for a job's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(device: str, backend: str, local_rank: int) -> tuple[torch.device, str]:
    """This rank's device and backend. On GPUs NCCL needs a GPU per rank; gloo (whose GPU
    collectives are all-reduce, broadcast and barrier) lets ranks share them, round robin - how a
    one-GPU machine runs TP ranks on GPU kernels (``bench agree --backend gloo``)."""
    kind = device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise WorkbenchError("device 'cuda' requested but CUDA is not available")
        gpus = torch.cuda.device_count()
        if local_rank >= gpus and backend != "gloo":
            raise WorkbenchError(f"local rank {local_rank} needs GPU {local_rank}, but this machine "
                                 f"has {gpus} (ranks can share GPUs over gloo, not NCCL)")
        dev = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise WorkbenchError(f"parallel runs use 'cpu' or 'cuda', got device {device!r}")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise WorkbenchError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    return dev, backend


def init_distributed(device: str = "auto", backend: str = "auto",
                     timeout_s: float = 60.0) -> DistContext:
    """Join the job that the environment describes (torchrun sets it; :func:`launch` too)."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise WorkbenchError(f"not inside a distributed job: {', '.join(missing)} unset (start "
                             "with torchrun, or use workbench.parallel.launch)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev, backend = _resolve(device, backend, local_rank)
    if backend == "nccl":  # NVLink multicast stays off unless the caller turned it on:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NCCL's NVLS collectives
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # symmetric memory's
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo",
                                                                          timeout=timeout)
    return DistContext(rank, world, local_rank, backend, dev, cpu_group, timeout_s)


def shutdown(timeout_s: float = 10.0) -> bool:
    """Destroy the process group within ``timeout_s``; False if it did not finish in time.

    CUDA graphs that captured collectives must be released (``graph.reset()``) before this.
    """
    if not dist.is_initialized():
        return True
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    done = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        finally:
            done.set()

    threading.Thread(target=destroy, daemon=True).start()
    return done.wait(timeout_s)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphan ranks)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's finally-block still kills the ranks it started


def _child(fn: Callable, rank: int, world: int, port: int, device: str, backend: str,
           timeout_s: float, threads: int, results: Any, plugins: list, args: tuple,
           kwargs: dict) -> None:
    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    _thread_lock_for_tqdm()
    code = 0
    try:
        ctx = init_distributed(device, backend, timeout_s)
        with installed(plugins):  # the parent's plug-in overrides (a lab's student function)
            # by value (plain pickle): the queue's own pickler would pass a tensor as a handle to
            # shared memory, which dies with this process before the parent opens it
            results.put((rank, "ok", pickle.dumps(fn(ctx, *args, **kwargs))))
        shutdown()
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
        first = str(err).splitlines()[0] if str(err) else ""
        results.put((rank, "error", (f"{type(err).__name__}: {first}", traceback.format_exc())))
        code = 1
    results.close()
    results.join_thread()  # flush the result to the parent before leaving
    os._exit(code)  # skip interpreter teardown: nothing left to hang on


def _thread_lock_for_tqdm() -> None:
    """Give tqdm a thread lock in a rank: its default is a multiprocessing lock (a named semaphore
    the parent's resource tracker reports as leaked, since a rank leaves with ``os._exit``)."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _stop(procs: list) -> None:
    """Terminate, then kill, every rank still alive; reap them all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 3
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


def launch(fn: Callable, world_size: int, *args: Any, device: str = "cpu", backend: str = "auto",
           timeout_s: float = 120.0, collective_timeout_s: float | None = None, threads: int = 1,
           **kwargs: Any) -> list[Any]:
    """Run ``fn(ctx, *args, **kwargs)`` on ``world_size`` new processes; their results by rank.

    ``fn`` must be importable (a module-level function of a module, not a notebook cell). Plug-in
    overrides active here (:func:`workbench.plug.override`) are installed on every rank too
    (:mod:`workbench.parallel.plugins`). The job
    fails as one: the first rank to raise or die, or ``timeout_s`` passing, stops every rank and
    raises WorkbenchError with the cause. ``collective_timeout_s`` bounds each collective inside
    (default: ``timeout_s``); with it, ``timeout_s`` may be ``math.inf`` (no bound on the job: a
    dead or hung rank still ends it, its peers' collectives time out). ``threads``: torch CPU
    threads per rank (0 keeps torch's default).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise WorkbenchError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not timeout_s > 0:
        raise WorkbenchError(f"timeout_s must be > 0, got {timeout_s}")
    if not 0 < (collective_timeout_s or timeout_s) < math.inf:
        raise WorkbenchError("each collective needs a finite timeout: collective_timeout_s > 0 "
                             f"(got {collective_timeout_s}) or a finite timeout_s (got {timeout_s})")
    plugins = pack_active()  # before any process starts: a function that cannot travel fails here
    mpc = mp.get_context("spawn")  # fork would copy this process's threads and CUDA state
    results = mpc.Queue()
    port = free_port()
    procs = [mpc.Process(target=_child, daemon=True, name=f"workbench-rank{rank}",
                         args=(fn, rank, world_size, port, device, backend,
                               collective_timeout_s or timeout_s, threads, results, plugins,
                               args, kwargs))
             for rank in range(world_size)]
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while len(out) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.1)
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) and r not in out for r, p in enumerate(procs)):
                    _fail(results, procs, out, {})
                if time.monotonic() > deadline:
                    late = [r for r in range(world_size) if r not in out]
                    raise WorkbenchError(f"parallel job timed out after {timeout_s:.0f} s: "
                                         f"rank(s) {late} did not finish; all ranks stopped")
                continue
            if status == "error":
                _fail(results, procs, out, {rank: payload})
            out[rank] = pickle.loads(payload)
    finally:
        _stop(procs)
        results.close()
    return [out[r] for r in range(world_size)]


def _fail(results: Any, procs: list, done: dict, errors: dict[int, tuple[str, str]]) -> None:
    """Stop every rank, then raise one error that names the root cause first.

    A rank that died without a word (killed, crashed) is the likeliest cause, then ranks that
    raised their own error, then ranks that only saw a peer vanish (communication errors).
    """
    wait_until = time.monotonic() + 0.5  # let the others report and the dead ones be reaped
    while time.monotonic() < wait_until:
        try:
            rank, status, payload = results.get(timeout=0.05)
        except queue_mod.Empty:
            continue
        if status == "error":
            errors.setdefault(rank, payload)
    died = [f"rank {r} {_exit_reason(p.exitcode)}" for r, p in enumerate(procs)
            if p.exitcode not in (None, 0) and r not in errors and r not in done]
    silent = [r for r, p in enumerate(procs)
              if p.exitcode is None and r not in errors and r not in done]
    _stop(procs)
    comm = lambda r: is_comm_error(errors[r][0])  # noqa: E731
    said = [f"rank {r} failed: {tidy_error(errors[r][0])}" for r in sorted(errors, key=comm)]
    if silent and errors and all(comm(r) for r in errors):  # the others gave up waiting on them
        died.append(f"rank(s) {silent} stopped answering (hung?)")
    message = "; ".join((died + said)[:2]) or "a rank failed"
    err = WorkbenchError(f"parallel job failed: {message}; all ranks stopped")
    first = sorted(errors, key=comm)
    err.rank_traceback = errors[first[0]][1] if first else ""  # for debugging
    raise err


def in_sequence(ctx: DistContext, calls: list[tuple[Callable, tuple]]) -> list[Any]:
    """Run several rank functions one after the other in one job (starting ranks costs seconds):
    ``launch(in_sequence, n, [(generate_worker, (jobs,)), (decode_worker, (bench,))])``."""
    return [fn(ctx, *args) for fn, args in calls]

