"""Hetis: serve LLMs on mixed GPU fleets; divide heterogeneous GPU pools fairly."""
from hetis.engine.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "Client", "AsyncClient", "RequestOutput"]
__version__ = "0.1.0"


def __getattr__(name):  # keep `import hetis` light: torch-heavy and grpc parts load on use
    if name in ("LLM", "RequestOutput"):
        from hetis import llm
        return getattr(llm, name)
    if name in ("Client", "AsyncClient"):
        from hetis import client
        return getattr(client, name)
    raise AttributeError(f"module 'hetis' has no attribute {name!r}")
