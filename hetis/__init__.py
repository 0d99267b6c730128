"""Hetis: serve LLMs on mixed GPU fleets; divide heterogeneous GPU pools fairly."""
import os

# gRPC's fork support restarts its poller in a child between fork and exec; grpcio >= 1.81
# then aborts the child (grpc/grpc#43055) when a process with live channels starts a
# subprocess (hetis up restarting a worker, a dense worker starting its TP ranks, Redis
# restarted under a test). Hetis never uses gRPC across a fork, so it is turned off
# (before grpc is first imported; an explicit setting wins).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from hetis.engine.sampling import SamplingParams  # noqa: E402

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
