"""Offloading across GPU, CPU and disk (FlexGen) and flash-aware loading (LLM in a flash).

``policy``: placement percentages and budget; ``memory``: the fast-memory plan, the budget check and
measured peaks; ``layout``: the model as units; ``store``: the weight tiers; ``kvcache``: KV cache
and activations on tiers; ``loader``: prefetching into slots; ``schedule``: row-by-row and block
schedules; ``cost``: cost model and policy search; ``calibrate``: its parameters measured;
``fit``: its parameters fitted to runs; ``bench`` / ``report``: benchmark rows, bars, and reading
a committed run back; ``flash``: sparse FFN loading. Taught in notebook ``06_offloading``.
"""

from workbench.offload.memory import MemoryPlan, check_policy, plan_memory
from workbench.offload.policy import Budget, Policy, Split
from workbench.offload.schedule import OffloadedModel, OffloadRun
from workbench.offload.store import WeightStore

__all__ = ["Budget", "MemoryPlan", "OffloadRun", "OffloadedModel", "Policy", "Split",
           "WeightStore", "check_policy", "plan_memory"]
