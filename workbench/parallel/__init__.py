"""Model parallelism over ``torch.distributed``: tensor parallel layers (notebook 04), pipeline
stages and schedules (notebook 05), the launcher, and generation on a TP x PP grid of ranks."""

from workbench.parallel.engine import GenerateJob, generate_parallel, generate_worker
from workbench.parallel.launch import DistContext, free_port, init_distributed, launch, shutdown
from workbench.parallel.plan import ParallelConfig, balanced_stages, shard_config

__all__ = ["DistContext", "GenerateJob", "ParallelConfig", "balanced_stages", "free_port",
           "generate_parallel", "generate_worker", "init_distributed", "launch", "shard_config",
           "shutdown"]
