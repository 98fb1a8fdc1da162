"""The launcher: a rank that dies, raises or hangs ends the job with a clear error within the
timeout, and no rank process is left behind. (Results by rank: tests/test_parallel_generate.py.)"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.parallel.faults import fail_on_purpose
from workbench.parallel.launch import free_port, launch


def _assert_gone(pid_dir: Path, world: int) -> None:
    pids = [int((pid_dir / f"{r}.pid").read_text()) for r in range(world)]
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # reaped: not even a zombie
            os.kill(pid, 0)


@pytest.mark.parametrize("action, expected", [
    ("kill", r"rank 1 killed by signal SIGKILL"),
    ("raise", r"rank 1 failed: ValueError: rank 1 failed on purpose"),
    ("hang", r"rank\(s\) \[1\] stopped answering \(hung\?\); rank [02] failed: .*"),  # their all-reduce times out after 3 s
])
def test_a_failing_rank_stops_the_job(tmp_path, action, expected):
    start = time.monotonic()
    with pytest.raises(WorkbenchError, match=expected) as err:
        launch(fail_on_purpose, 3, action, pid_dir=str(tmp_path), timeout_s=60, collective_timeout_s=3)
    assert ".cc:" not in str(err.value) and "This is typically" not in str(err.value)  # one tidy line
    assert time.monotonic() - start < 60
    _assert_gone(tmp_path, 3)


def _a_tensor(ctx):
    return torch.full((3,), float(ctx.rank), dtype=torch.bfloat16)


def test_ranks_can_return_tensors():
    # by value: a shared-memory handle would die with the rank before the parent opened it
    out = launch(_a_tensor, 2, timeout_s=60)
    assert [t.tolist() for t in out] == [[0.0] * 3, [1.0] * 3] and out[0].dtype == torch.bfloat16


def test_gloo_ranks_may_share_a_gpu_nccl_ranks_may_not(monkeypatch):
    from workbench.parallel.launch import _resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    assert _resolve("cuda", "gloo", 3) == (torch.device("cuda", 1), "gloo")
    assert _resolve("cuda", "auto", 1) == (torch.device("cuda", 1), "nccl")
    with pytest.raises(WorkbenchError, match="share GPUs over gloo, not NCCL"):
        _resolve("cuda", "auto", 2)


def tp_group(ctx):
    """A TP group of make_mesh (TP 2 of the 8B shape's heads), with the job's timeout."""
    from workbench.model.presets import preset_config
    from workbench.parallel.plan import ParallelConfig, make_mesh

    return make_mesh(ctx.rank, ctx.world_size, preset_config("llama-3.1-8b"), ParallelConfig(tp=2),
                     ctx.backend, ctx.timeout_s).tp_group


def test_a_hang_in_a_subgroup_times_out_like_the_world_group(tmp_path):
    """A new group does not inherit the job's timeout (gloo's default is 30 minutes): make_mesh
    gives its groups the job's, so a job with no overall limit still ends when a rank hangs."""
    start = time.monotonic()
    with pytest.raises(WorkbenchError, match=r"rank\(s\) \[1\] stopped answering \(hung\?\)"):
        launch(fail_on_purpose, 2, "hang", pid_dir=str(tmp_path), group=tp_group,  # not WORLD's
               timeout_s=math.inf, collective_timeout_s=3)
    assert time.monotonic() - start < 60
    _assert_gone(tmp_path, 2)


def test_bad_arguments():
    with pytest.raises(WorkbenchError, match="world_size"):
        launch(fail_on_purpose, 0)
    with pytest.raises(WorkbenchError, match="finite timeout"):
        launch(fail_on_purpose, 2, timeout_s=math.inf)
    with pytest.raises(WorkbenchError, match="how must be one of raise, kill, hang"):
        launch(fail_on_purpose, 1, "explode", timeout_s=60)
    assert 0 < free_port() < 65536
