"""Generation engines: requests in, tokens out, every step recorded."""

from workbench.engine.continuous import ContinuousEngine, run_continuous
from workbench.engine.requests import Request, RequestTrace
from workbench.engine.run import EngineRun
from workbench.engine.sampling import SamplingParams
from workbench.engine.scheduler import EngineConfig
from workbench.engine.static import generate_static, run_static

__all__ = ["ContinuousEngine", "EngineConfig", "EngineRun", "Request", "RequestTrace",
           "SamplingParams", "generate_static", "run_continuous", "run_static"]
