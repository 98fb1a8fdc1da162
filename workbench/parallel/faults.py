"""How a distributed job fails: what a rank's error says, and a rank that fails on purpose.

* :func:`is_comm_error` - whether a rank's error is only a collective that lost its peer (a
  consequence), not the cause: :func:`~workbench.parallel.launch.launch` names the cause first;
* :func:`tidy_error` - a rank's one-line error without gloo's source location and advice;
* :func:`fail_on_purpose` - a rank function that raises, dies or hangs, to watch a job end
  (notebook 04, the fault tests).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.parallel.launch import DistContext

__all__ = ["FAULTS", "fail_on_purpose", "is_comm_error", "tidy_error"]

_COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe")


def is_comm_error(err: BaseException | str) -> bool:
    """Whether ``err`` (an exception, or its one-line text) is a collective that failed because
    a peer died or stopped answering: a ``torch.distributed`` error, or gloo's and NCCL's plain
    RuntimeError that names a timeout or a lost connection."""
    if isinstance(err, dist.DistError):
        return True
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return any(w in text.lower() for w in _COMM_WORDS)


def tidy_error(text: str) -> str:
    """A rank's one-line error without the C++ source location and the advice gloo appends:
    ``RuntimeError: [.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:43745.
    This is typically caused by ...`` -> ``RuntimeError: Connection closed by peer [127.0.0.1]:43745``."""
    text = re.sub(r"\[[^\]\s]+\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return re.split(r"\.\s+This is typically", text)[0]


FAULTS = ("raise", "kill", "hang")


def fail_on_purpose(ctx: DistContext, how: str, victim: int = 1, pid_dir: str | None = None,
                    group: Callable[[DistContext], Any] | None = None) -> int:
    """A rank function that fails on purpose, to watch a job end (notebook 04, the tests).

    Every rank joins a first all-reduce (the job works), then rank ``victim`` raises (``"raise"``),
    dies without a word (``"kill"``: SIGKILL, as the out-of-memory killer or a lost node would) or
    hangs (``"hang"``: never joins the next collective) while the others wait for it in a second
    all-reduce. ``pid_dir``: each rank writes its process id there (``<rank>.pid``), so that a
    test can check that none is left. ``group``: a function of ``ctx`` that returns the group the
    all-reduces run on (default: the job's), e.g. a TP group of
    :func:`~workbench.parallel.plan.make_mesh`. Returns the rank on the ranks that get through.
    """
    if how not in FAULTS:
        raise WorkbenchError(f"how must be one of {', '.join(FAULTS)}, got {how!r}")
    if pid_dir is not None:
        with open(os.path.join(pid_dir, f"{ctx.rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    on = group(ctx) if group is not None else None
    x = torch.ones(1, device=ctx.device)

    def all_reduce() -> None:
        dist.all_reduce(x, group=on)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()  # NCCL returns at once: wait where the peer is missing

    all_reduce()
    if ctx.rank == victim:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "hang":
            time.sleep(3600)
        raise ValueError(f"rank {victim} failed on purpose")
    all_reduce()
    return ctx.rank
