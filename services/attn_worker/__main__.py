"""Attention worker: holds KV cache for head groups and computes their decode attention.

    python -m services.attn_worker --port 50071 --redis-url redis://localhost:6379/0 \\
        [--worker-id attn-0] [--advertise-host HOST] [--device cpu|cuda:N] \\
        [--kv-tokens N] [--threads T] [--metrics-port P] [--log-level INFO]

It holds no weights. It registers in Redis, waits for a dense worker's Join
(gRPC), then serves attention over torch.distributed until SIGTERM.
"""
from __future__ import annotations

import argparse

from hetis import defaults
from hetis.mesh.flags import WorkerConfig, add_worker_flags, from_args


def parse(argv=None) -> WorkerConfig:
    ap = argparse.ArgumentParser(prog="python -m services.attn_worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_flags(ap, default_port=defaults.ATTN_WORKER_PORT)
    return from_args(WorkerConfig, ap.parse_args(argv))


def main(argv=None) -> None:
    cfg = parse(argv)
    from services.attn_worker.server import run
    run(cfg)


if __name__ == "__main__":
    main()
