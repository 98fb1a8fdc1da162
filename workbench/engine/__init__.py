"""Generation engines: requests in, tokens out, every step recorded."""

from workbench.engine.sampling import SamplingParams
from workbench.engine.static import GenerationOutput, StaticRun, generate_static

__all__ = ["GenerationOutput", "SamplingParams", "StaticRun", "generate_static"]
