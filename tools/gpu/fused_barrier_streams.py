"""The fused all-reduce's barrier timed with peers on ONE GPU: ``world`` ranks as streams.

    PYTHONPATH=. python tools/gpu/fused_barrier_streams.py [--worlds 1,2,4] [--rows 1,32] [--calls 400]
        [--repeats 3] [--against OTHER.py] [--json OUT.json]

Each rank has its own buffers and signal pad in the one GPU's memory and its own stream; ``calls``
calls of :func:`workbench.parallel.allreduce_norm.allreduce_add_rms` (hidden 4096, fp32 so that
the sums are exact, the two buffers in turn) are captured on every stream into one CUDA graph (the
ranks its parallel branches; launching from Python would time the host), and its replay's time
over ``calls`` is a call's cost with the peers' flags in the same GPU's memory: the barrier's
atomics, polling and fence without NVLink (across GPUs each flag and row crosses it).
``--against`` times a second implementation of the module (another version of
``allreduce_norm.py``) in the same process, in turns, for an A/B comparison. A benchmark, not a
test: nothing asserted but the sums.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

from workbench.parallel import allreduce_norm


def load(path: str):
    spec = importlib.util.spec_from_file_location("allreduce_norm_other", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_calls(module, world: int, rows: int, calls: int, n: int = 4096) -> float:
    """Seconds a call, ``world`` ranks as streams, after every rank's compiled kernel is loaded."""
    dev, dtype = torch.device("cuda"), torch.float32
    buffers, pads, bufs, pad_ptrs = allreduce_norm.stream_ranks(world, rows, n, dtype, dev,
                                                                module.allreduce_add_rms)
    weight = torch.ones(n, device=dev, dtype=dtype)
    residuals = [torch.zeros(rows, n, device=dev, dtype=dtype) for _ in range(world)]
    for r in range(world):
        buffers[r].fill_(r + 1)
    streams = [torch.cuda.Stream() for _ in range(world)]
    graph, main = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, stream=main):  # one branch a rank
        for s in streams:
            s.wait_stream(main)
        for c in range(calls):
            for r in range(world):
                with torch.cuda.stream(streams[r]):
                    module.allreduce_add_rms(bufs, pad_ptrs, (c % 2) * rows * n, residuals[r],
                                             weight, 1e-5, r, timeout_s=20.0)
        for s in streams:
            main.wait_stream(s)
    for res in residuals:  # capture ran nothing
        res.zero_()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    took = (time.perf_counter() - start) / calls
    want = calls * world * (world + 1) / 2  # every call added 1 + ... + world
    assert all(float(res[0, 0]) == want for res in residuals), ("wrong sums", want)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--against", help="another allreduce_norm.py, timed in turns")
    parser.add_argument("--json")
    args = parser.parse_args()
    modules = {"this": allreduce_norm} | ({"against": load(args.against)} if args.against else {})
    results = []
    for world in map(int, args.worlds.split(",")):
        for rows in map(int, args.rows.split(",")):
            times = {name: [] for name in modules}
            for _ in range(args.repeats):  # in turns, so that drift hits both alike
                for name, module in modules.items():
                    times[name].append(time_calls(module, world, rows, args.calls) * 1e6)
            row = {"world": world, "rows": rows} | {f"{k}_us": statistics.median(v)
                                                    for k, v in times.items()}
            results.append(row)
            print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "calls": args.calls, "this": allreduce_norm.__file__,
                       "against": args.against, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
