"""OEF allocator service: ``python -m services.allocator [flags]``.

Serves gRPC ``hetis.v1.Allocator`` (plus grpc.health.v1 and reflection) and
Prometheus metrics; keeps inventory, tenants and round state in Redis, so a
restarted allocator resumes where it stopped.

Flags:
  --port PORT               gRPC port (default 50061)
  --redis-url URL           Redis holding the state (default $HETIS_REDIS_URL or
                            redis://localhost:6379/0)
  --redis-prefix PREFIX     key prefix (default hetis:allocator:)
  --mode MODE               allocation the rounds follow: cooperative (default),
                            noncooperative, max-min, throughput-sum, equal,
                            partial-allocation
  --metrics-port PORT       Prometheus port (default 9461; -1 turns it off, 0 picks one)
  --round-seconds S         length of a round and of a lease (default 60)
  --debounce-seconds S      quiet time after a change before recomputing (default 0.5)
  --log-level LEVEL         DEBUG, INFO (default), WARNING, ERROR
"""
from __future__ import annotations

import argparse
import os
import sys

from hetis.service import serve, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    from .modes import MODES
    ap = argparse.ArgumentParser(prog="python -m services.allocator", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=50061)
    ap.add_argument("--redis-url", default=os.environ.get("HETIS_REDIS_URL", "redis://localhost:6379/0"))
    ap.add_argument("--redis-prefix", default="hetis:allocator:")
    ap.add_argument("--mode", choices=list(MODES), default="cooperative")
    ap.add_argument("--metrics-port", type=int, default=9461)
    ap.add_argument("--round-seconds", type=float, default=60.0)
    ap.add_argument("--debounce-seconds", type=float, default=0.5)
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    if args.round_seconds <= 0 or args.debounce_seconds < 0:
        ap.error("--round-seconds must be > 0 and --debounce-seconds >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    import redis

    from hetis.v1 import allocator_pb2_grpc
    from .server import Allocator
    from .store import Store

    store = Store(args.redis_url, args.redis_prefix)
    try:
        store.ping()
    except redis.exceptions.RedisError as e:
        print(f"allocator: cannot reach Redis at {args.redis_url}: {e}", file=sys.stderr)
        return 1
    impl = Allocator(store, args.mode, args.round_seconds, args.debounce_seconds)
    serve(name="allocator", port=args.port, metrics_port=args.metrics_port,
          register=[lambda s: allocator_pb2_grpc.add_AllocatorServicer_to_server(impl, s)],
          service_names=["hetis.v1.Allocator"], on_stop=impl.close)
    return 0


if __name__ == "__main__":
    sys.exit(main())
