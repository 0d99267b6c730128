"""Router: the public hetis.v1.Generation API, scheduling and head dispatch.

    python -m services.router --port 50051 --redis-url redis://localhost:6379/0 \\
        [--dense-worker HOST:PORT[,HOST:PORT...]] [--dense-workers N] [--attn-workers N] \\
        [--policy hetis|local-only|round-robin] \\
        [--model PATH] [--max-num-seqs 64] [--max-num-batched-tokens 1024] \\
        [--max-model-len 2048] [--max-queue 1024] [--max-prompt-chars N] \\
        [--startup-timeout 300] [--metrics-port P] [--log-level INFO] \\
        [--http-port P] [--api-key KEY] [--served-model-name NAME]

At start it listens at once (health NOT_SERVING), waits for --dense-workers
dense workers (those named by --dense-worker, and any registered in Redis)
and for N live attention workers in Redis, has each dense worker open a
tensor channel to each attention worker, then reports SERVING. Each dense
worker is a serving instance with its own batch; the attention workers are
one pool shared by all. Dense and attention workers that register later join
while it serves. It runs on asyncio (uvloop when installed): one
event loop for every stream and the health service, no thread per stream.
With --http-port, the same loop serves the OpenAI-compatible HTTP API
(docs/http.md). With --api-key (or $HETIS_API_KEY), both public APIs require
it: HTTP 'Authorization: Bearer KEY', gRPC metadata 'authorization: Bearer KEY'.
"""
from __future__ import annotations

import argparse

from hetis import defaults
from hetis.mesh.flags import (RouterConfig, add_redispatch_flags, add_security_flags, api_key_arg, from_args,
                               nonneg_int, port_or_zero, positive_int)
from hetis.security import api_key_from_env


def parse(argv=None) -> RouterConfig:
    ap = argparse.ArgumentParser(prog="python -m services.router", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=defaults.ROUTER_PORT, help="public gRPC port")
    ap.add_argument("--host", default="0.0.0.0", help="interface to bind")
    ap.add_argument("--redis-url", default=defaults.default_redis_url(),
                    help="Redis (env HETIS_REDIS_URL)")
    ap.add_argument("--dense-worker", default="",
                    help="dense workers' gRPC host:port, comma-separated (more are found in Redis)")
    ap.add_argument("--dense-workers", type=positive_int, default=1,
                    help="dense workers to wait for before serving; more join later (default 1)")
    ap.add_argument("--attn-workers", type=nonneg_int, default=0,
                    help="attention workers to wait for in Redis before serving; more join later (default 0)")
    ap.add_argument("--policy", default=defaults.DEFAULT_POLICY, choices=defaults.POLICIES,
                    help="head dispatch policy")
    ap.add_argument("--model", default=None,
                    help="model (for the tokenizer); must be the dense worker's (default: SmolLM2-135M)")
    ap.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences per step at most")
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=1024,
                    help="tokens per step at most")
    ap.add_argument("--max-model-len", type=positive_int, default=2048,
                    help="prompt + output tokens at most")
    ap.add_argument("--max-queue", type=positive_int, default=1024,
                    help="waiting requests beyond which new ones get RESOURCE_EXHAUSTED")
    ap.add_argument("--max-prompt-chars", type=nonneg_int, default=0,
                    help="longer prompts (or chats) get INVALID_ARGUMENT before tokenizing "
                    "(default 0: 32 x --max-model-len)")
    add_redispatch_flags(ap)
    ap.add_argument("--startup-timeout", type=float, default=300.0,
                    help="seconds to wait for the workers at start")
    ap.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0: free one)")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--step-log", default=None, metavar="FILE",
                    help="append one JSON line per executed step to FILE: [seconds, tokens, "
                    "sampled sequences, KV tokens read, decode (sequence, group) pairs, prefill "
                    "attention flops]; what bench/sim_vs_real.py calibrates the simulator on")
    ap.add_argument("--http-port", type=port_or_zero, default=None,
                    help="serve the OpenAI-compatible HTTP API on this port (0: a free one; "
                    "default: off)")
    ap.add_argument("--api-key", type=api_key_arg, default=api_key_from_env(),
                    help="require this key on the public APIs (default: $HETIS_API_KEY; unset: open)")
    ap.add_argument("--served-model-name", default=None,
                    help="the model name the HTTP API answers to (default: the dense worker's)")
    add_security_flags(ap)
    return from_args(RouterConfig, ap.parse_args(argv))


def main(argv=None) -> None:
    cfg = parse(argv)
    from services.router.server import run
    run(cfg)


if __name__ == "__main__":
    main()
