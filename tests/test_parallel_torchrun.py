"""``torchrun -m workbench generate --tp/--pp`` on 2 gloo ranks, the way the README starts a job:
one device's tokens (one agent, or two meeting through the multi-node rendezvous), and the fault
bar - a rank killed or hung mid-run ends the job with an error within 60 s and leaves no process
behind. (The notebook launcher's faults: test_parallel_launch.py.)

torchrun's agent stops the other ranks when one dies; a rank that hangs is found by its peers,
whose collectives give up after ``--timeout`` seconds; the agent then sends the hung rank SIGTERM
and, 30 s later, SIGKILL (a stopped process ignores SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.parallel.launch import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds the ranks through /proc")

PROMPTS = [{"prompt": "def fibonacci(n):", "max_new_tokens": 10}, {"prompt": "import os"},
           {"prompt_ids": [505, 842, 66], "max_new_tokens": 4}]


def _torchrun(tmp_path: Path, prompts: list[dict], *args: str,
              agent: tuple[str, ...] = ("--standalone", "--nproc-per-node", "2"),
              name: str = "torchrun") -> tuple[subprocess.Popen, Path]:
    """Start ``torchrun <agent> -m workbench generate <args>`` in the background; its stdout and
    stderr go to a log file (returned)."""
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", *agent,
           "-m", "workbench", "generate", "--prompts", str(src), "--output",
           str(tmp_path / "out.jsonl"), "--device", "cpu", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with log.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log


def _outputs(path: Path) -> list[list[int]]:
    return [json.loads(line)["output_ids"] for line in path.read_text().splitlines()]


def _one_device(tmp_path: Path) -> list[list[int]]:
    """The same prompts served by one process (``generate`` without --tp/--pp)."""
    one = tmp_path / "one.jsonl"
    assert main(["generate", "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(one),
                 "--max-new-tokens", "8", "--no-progress", "--device", "cpu"]) == 0
    return _outputs(one)


def _ranks(agent: int) -> dict[int, int]:
    """The rank processes torchrun's agent started: {RANK: pid}."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{agent}\n" not in status.read_text():
                continue
            env = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        rank = [v[5:] for v in env if v.startswith(b"RANK=")]
        if rank:
            found[int(rank[0])] = int(status.parent.name)
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie is done too


@pytest.mark.parametrize("grid", [["--tp", "2"], ["--pp", "2", "--micro-batches", "2"],
                                  ["--tp", "2", "--strategy", "continuous", "--kv", "paged",
                                   "--batch-size", "2"]])
def test_torchrun_gives_one_devices_tokens(tmp_path, grid):
    proc, log = _torchrun(tmp_path, PROMPTS, *grid, "--max-new-tokens", "8", "--no-progress")
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    got = _outputs(tmp_path / "out.jsonl")
    assert got == _one_device(tmp_path) and [len(ids) for ids in got] == [10, 8, 4]


def test_two_nodes_meet_through_the_rendezvous(tmp_path):
    """The README's multi-node command, both "nodes" on this host: two torchrun agents of one
    process each find each other through the c10d rendezvous and serve TP 2 together."""
    port = str(free_port())
    agents = [_torchrun(tmp_path, PROMPTS, "--tp", "2", "--max-new-tokens", "8", "--no-progress",
                        agent=("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job1"),
                        name=f"node{n}") for n in range(2)]
    for proc, log in agents:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert _outputs(tmp_path / "out.jsonl") == _one_device(tmp_path)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_killed_or_hung_mid_run_ends_the_torchrun_job(tmp_path, how):
    """Rank 1 is killed (SIGKILL) or frozen (SIGSTOP: a hang) once rank 0's progress bar shows
    the job serving; the job must end with an error naming the cause within 60 s."""
    long = [{"prompt": f"def f{i}(x):", "max_new_tokens": 256} for i in range(16)]
    proc, log = _torchrun(tmp_path, long, "--tp", "2", "--timeout", "5")
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while "static:" not in log.read_text():  # rank 0 serves: loaded, joined, decoding
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        ranks = _ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        start = time.monotonic()
        code = proc.wait(timeout=90)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:  # the job did not end: leave no process for the next tests
            proc.kill()
            for pid in ranks.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert code != 0 and took < 60, (code, took, text[-3000:])
    assert not (tmp_path / "out.jsonl").exists()
    assert all(_gone(pid) for pid in ranks.values())
    if how == "kill":  # torchrun's report names the rank that died first
        root = text[text.index("Root Cause"):]
        assert "rank      : 1" in root and "SIGKILL" in root, text[-3000:]
    else:  # rank 0 gave up on its peer after --timeout and said so in one line
        said = [line[line.index("workbench: error"):] for line in text.splitlines()  # after any bar
                if "workbench: error: rank 0:" in line]
        assert said and ("a collective failed - a peer rank died or did not answer within --timeout 5 s"
                         in said[0]) and ".cc:" not in said[0], text[-3000:]
