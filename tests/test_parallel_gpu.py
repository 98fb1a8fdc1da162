"""What one GPU can check of the parallel code (skipped without CUDA; run on the device machine).

* ``bench tp --alone --symm-mem``: the one-shot all-reduce through symmetric memory over a rank
  alone, inside the fast step - a sum over one rank changes nothing, so the step's logits are the
  eager step's;
* ``bench agree --backend gloo``: TP ranks sharing the GPU (gloo's all-reduce on CUDA tensors),
  the bf16 logits within twice one device's own bf16 error.

With 2 GPUs or more (one NCCL rank each), the fault bar over NCCL: a rank killed or hung between two
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
    out = tmp_path / "alone.json"
    assert main(["bench", "tp", "--tp", "1,2", "--alone", "--fast", "--symm-mem", "--batch-sizes", "2",
                 "--context-len", "6", "--steps", "2", "--warmup", "1", "--device", "cuda",
                 "--dtype", "float32", "--json", str(out)]) == 0
    rows = {r["tp"]: r for r in json.loads(out.read_text())["results"]}
    two = rows[2]
    assert not any(k.endswith("_error") for k in two), two
    assert two["fast_symm_step_ms"] > 0 and two["fast_symm_token_agreement"] == 1.0
    assert two["fast_symm_max_abs_logit_diff"] < 1e-3  # fp32: the same sums as the eager step
    assert "fast_symm_step_ms" not in rows[1]  # TP 1 has no all-reduce to run


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
