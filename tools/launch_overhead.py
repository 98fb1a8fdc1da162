"""Host cost of launching a GPU kernel from PyTorch, eager vs replayed from a CUDA graph.

    python tools/launch_overhead.py [--n 20000] [--json out.json]

A tiny in-place add (one element) is launched ``n`` times from Python and waited for once: the time
per launch is what the host pays per kernel (Python, the dispatcher, the driver call). The same adds
captured in one CUDA graph and replayed give the GPU's own time per tiny kernel. An eager decode step
of N kernels costs at least N x the first; the gap between the two is what CUDA graphs remove.
"""

import argparse
import json
import time

import torch

from workbench.engine.cudagraph import capture_graph

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=20000)
parser.add_argument("--json", default=None)
args = parser.parse_args()

x = torch.zeros(1, device="cuda")
for _ in range(100):
    x.add_(1)
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(args.n):
    x.add_(1)
torch.cuda.synchronize()
eager_us = (time.perf_counter() - t0) / args.n * 1e6

per_graph = 1000
graph, _ = capture_graph(lambda: [x.add_(1) for _ in range(per_graph)])
graph.replay()
torch.cuda.synchronize()
reps = max(1, args.n // per_graph)
t0 = time.perf_counter()
for _ in range(reps):
    graph.replay()
torch.cuda.synchronize()
graph_us = (time.perf_counter() - t0) / (reps * per_graph) * 1e6
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "launches": args.n,
       "eager_us_per_kernel": eager_us, "graph_us_per_kernel": graph_us}
print(json.dumps(out, indent=1))
if args.json:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
