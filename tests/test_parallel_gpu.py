"""What one GPU can check of the parallel code (skipped without CUDA; run on the device machine).

* ``bench tp --alone --symm-mem --fused-allreduce``: the one-shot all-reduce through symmetric
  memory over a rank alone, inside the fast step, plain and fused into the next norm - a sum over
  one rank changes nothing, so the step's logits are the eager step's; the fused kernel's
  timeout: a peer that never arrives makes it trap, not hang; and its barrier with peers, 2 and 4
  ranks as streams of the one GPU (everything of a TP step's all-reduce but NVLink);
* ``bench agree --backend gloo``: TP ranks sharing the GPU (gloo's all-reduce on CUDA tensors),
  the bf16 logits within twice one device's own bf16 error.

With 2 GPUs or more (one NCCL rank each), the fused all-reduce across GPUs (fp32: the eager step's
logits), and the fault bar over NCCL: a rank killed or hung between two
all-reduces, on the job's group or a TP subgroup, ends the job with an error within 60 s and leaves
no process behind (on gloo: ``tests/test_parallel_launch.py``).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.test_parallel_launch import _assert_gone, tp_group
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.parallel.faults import fail_on_purpose
from workbench.parallel.launch import launch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_alone_with_the_one_shot_over_a_rank_alone(tmp_path):
    """Both symmetric-memory all-reduces over a rank alone: the one-shot, and the one fused into
    the residual add and the next norm (o_proj and down writing into its buffers)."""
    out = tmp_path / "alone.json"
    assert main(["bench", "tp", "--tp", "1,2", "--alone", "--fast", "--symm-mem", "--fused-allreduce",
                 "--batch-sizes", "2", "--context-len", "6", "--steps", "2", "--warmup", "1",
                 "--device", "cuda", "--dtype", "float32", "--json", str(out)]) == 0
    rows = {r["tp"]: r for r in json.loads(out.read_text())["results"]}
    two = rows[2]
    assert not any(k.endswith("_error") for k in two), two
    for key in ("fast_symm", "fast_fused"):
        assert two[f"{key}_step_ms"] > 0 and two[f"{key}_token_agreement"] == 1.0
        assert two[f"{key}_max_abs_logit_diff"] < 1e-3  # fp32: the same sums as the eager step
        assert f"{key}_step_ms" not in rows[1]  # TP 1 has no all-reduce to run


_NEVER_ARRIVES = """
import time, torch
from workbench.parallel.allreduce_norm import allreduce_add_rms
dev = torch.device("cuda")
buffers = [torch.zeros(64, device=dev) for _ in range(2)]
pads = [torch.zeros(2, dtype=torch.int32, device=dev) for _ in range(2)]
address = lambda ts: torch.tensor([t.data_ptr() for t in ts], device=dev)
start = time.monotonic()
try:
    allreduce_add_rms(address(buffers), address(pads), 0, torch.zeros(1, 64, device=dev),
                      torch.ones(64, device=dev), 1e-5, 0, timeout_s=1.0)
    torch.cuda.synchronize()
    print("returned")
except Exception as e:
    print(f"raised after {time.monotonic() - start:.1f} s: {type(e).__name__}: {e}")
    raise SystemExit(3)
"""


def test_a_peer_that_never_arrives_traps_the_fused_allreduce():
    """Rank 0 of a fake pair whose peer never signals: the fused kernel spins until its timeout,
    then traps - the host's next synchronization raises (the CUDA context is lost, so this runs
    in a process of its own) instead of a CUDA graph waiting forever."""
    import subprocess
    import sys

    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", _NEVER_ARRIVES], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 3, run.stdout + run.stderr[-2000:]
    assert "raised after" in run.stdout and time.monotonic() - start < 60, run.stdout


_RANKS_AS_STREAMS = """
import sys, torch
from workbench.parallel.allreduce_norm import allreduce_add_rms, reference_add_rms, stream_ranks
world, rows, n, calls = int(sys.argv[1]), 3, 4096, 24
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(world)
buffers, pads, bufs, pad_ptrs = stream_ranks(world, rows, n, torch.float32, dev)
partials = torch.randn(calls, world, rows, n, generator=g, device=dev)
weight = torch.randn(n, generator=g, device=dev)
start = torch.randn(rows, n, generator=g, device=dev)
residuals = [start.clone() for _ in range(world)]
streams = [torch.cuda.Stream() for _ in range(world)]
hs = [[None] * calls for _ in range(world)]
for c in range(calls):  # every rank's calls queued on its own stream, the last rank's first
    offset = (c % 2) * rows * n
    for r in reversed(range(world)):
        with torch.cuda.stream(streams[r]):
            buffers[r][offset:offset + rows * n].view(rows, n).copy_(partials[c, r])
            hs[r][c] = allreduce_add_rms(bufs, pad_ptrs, offset, residuals[r], weight, 1e-5, r,
                                         timeout_s=10.0)
torch.cuda.synchronize()
want_r = start.clone()
for c in range(calls):
    want_h, want_r = reference_add_rms(list(partials[c]), want_r, weight, 1e-5)
    for r in range(world):
        assert torch.equal(hs[r][c], hs[0][c]), (c, r)  # every rank sums in the same order
    torch.testing.assert_close(hs[0][c], want_h, rtol=1e-4, atol=1e-4)
assert all(torch.equal(res, residuals[0]) for res in residuals)
torch.testing.assert_close(residuals[0], want_r, rtol=1e-4, atol=1e-4)
assert all(p.eq(calls).all() for p in pads), [p.tolist() for p in pads]  # every rank at call 24
print("ok")
"""


@pytest.mark.parametrize("world", [2, 4])
def test_fused_allreduce_ranks_as_streams_on_one_gpu(world):
    """The fused all-reduce's barrier on a GPU with peers: ``world`` ranks as streams of one GPU,
    each with its own buffers and signal pad in that GPU's memory, 24 calls queued on every
    stream (rows of the 8B shape's width, the two buffers in turn), so ranks run ahead and wait
    as they would across GPUs - only NVLink is missing. Every rank's output equals every other's
    and the sums, residual adds and norms of PyTorch; every flag holds the last call's number. A
    deadlock traps after 10 s (in a process of its own: a trap loses the CUDA context)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _RANKS_AS_STREAMS, str(world)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one NCCL rank each)")
def test_fused_allreduce_over_two_gpus_gives_the_eager_step(tmp_path):
    """TP 2 over two GPUs: the fused all-reduce reads the peer's partial sums over NVLink after
    the barrier; in fp32 the step's logits are the eager step's (NCCL's sums)."""
    out = tmp_path / "tp2.json"
    assert main(["bench", "tp", "--tp", "2", "--fast", "--fused-allreduce", "--batch-sizes", "1,3",
                 "--context-len", "6", "--steps", "2", "--warmup", "1", "--device", "cuda",
                 "--dtype", "float32", "--json", str(out)]) == 0
    for row in json.loads(out.read_text())["results"]:
        assert not any(k.endswith("_error") for k in row), row
        assert row["fast_fused_token_agreement"] == 1.0, row
        assert row["fast_fused_max_abs_logit_diff"] < 1e-3, row


def test_agree_with_ranks_sharing_the_gpu(tmp_path):
    out = tmp_path / "agree.json"
    assert main(["bench", "agree", "--device", "cuda", "--backend", "gloo", "--grids", "TP2",
                 "--rows", "2", "--new-tokens", "6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["hardware"]["backend"] == "gloo" and report["hardware"]["ranks"] == 2
    assert report["checks"]["all_within_tolerance"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one NCCL rank each)")
@pytest.mark.parametrize("action", ["kill", "hang"])
@pytest.mark.parametrize("subgroup", [False, True])
def test_a_failing_nccl_rank_stops_the_job(tmp_path, action, subgroup):
    start = time.monotonic()
    with pytest.raises(WorkbenchError, match=r"parallel job failed: .*all ranks stopped") as err:
        # the job's limit (50 s) only guards the test: NCCL's own timeout (5 s) must end it first
        launch(fail_on_purpose, 2, action, pid_dir=str(tmp_path), group=tp_group if subgroup else None,
               device="cuda", timeout_s=50, collective_timeout_s=5)
    assert time.monotonic() - start < 60, str(err.value)
    if action == "kill":
        assert "rank 1 killed by signal SIGKILL" in str(err.value)
    _assert_gone(tmp_path, 2)
