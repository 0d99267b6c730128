"""Attention worker: holds KV cache for head groups and computes their decode attention.

    python -m services.attn_worker --port 50071 --redis-url redis://localhost:6379/0 \\
        [--worker-id attn-0] [--advertise-host HOST] [--device cpu|cuda:N] \\
        [--kv-tokens N] [--threads T] [--metrics-port P] [--log-level INFO]

It holds no weights. It registers in Redis, waits for a dense worker's Join
(gRPC), then serves attention over torch.distributed until SIGTERM.
"""
from __future__ import annotations

import argparse

from hetis.worker_common import add_common_flags


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m services.attn_worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(ap, default_port=50071)
    ap.add_argument("--kv-tokens", type=int, default=131072,
                    help="KV capacity in tokens x head groups (default 131072)")
    args = ap.parse_args(argv)
    from services.attn_worker.server import run
    run(args)


if __name__ == "__main__":
    main()
