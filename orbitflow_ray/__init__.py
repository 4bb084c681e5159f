"""OrbitFlow on Ray: SLO-aware long-context LLM serving with per-request, per-layer KV placement."""

from orbitflow_ray.config import EngineConfig
from orbitflow_ray.outputs import RequestMetrics, RequestOutput
from orbitflow_ray.sampling_params import SamplingParams


def __getattr__(name: str):
    # The engine pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from orbitflow_ray.llm import LLM
        return LLM
    if name == "LLMEngine":
        from orbitflow_ray.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)


__all__ = ["EngineConfig", "LLM", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams"]
