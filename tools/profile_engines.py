"""Where a decode step's time goes in our engines (GPU): wall per step and a torch.profiler table.

    python tools/profile_engines.py --model preset:llama-3.2-1b --device cuda --batch 32
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from workbench.engine import EngineConfig, Request, run_continuous, run_static
from workbench.model.loading import load_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="preset:llama-3.2-1b")
parser.add_argument("--device", default="cuda")
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--prompt", type=int, default=128)
parser.add_argument("--steps", type=int, default=64)
args = parser.parse_args()
model = load_model(args.model, args.device, getattr(torch, args.dtype))
g = torch.Generator().manual_seed(0)
requests = [Request(tuple(torch.randint(0, model.config.vocab_size, (args.prompt,), generator=g)
                          .tolist()), args.steps, ignore_eos=True, id=i) for i in range(args.batch)]
config = EngineConfig(args.batch, 8192, max_model_len=args.prompt + args.steps)
runs = {"static": lambda: run_static(model, requests, args.batch),
        "continuous": lambda: run_continuous(model, requests, config)}
for name, fn in runs.items():
    fn()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    run = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds / len(run.timeline) * 1e3:.2f} ms/step over {len(run.timeline)} "
          f"steps, {args.batch * args.steps / seconds:.0f} tok/s")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8))
