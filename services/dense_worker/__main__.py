"""Dense worker: holds the weights, runs every step's dense math, samples.

    python -m services.dense_worker --port 50061 --redis-url redis://localhost:6379/0 \\
        [--model PATH] [--dtype float32|bfloat16] [--worker-id dense-0] [--advertise-host HOST] \\
        [--device cpu|cuda:N] [--kv-tokens N] [--dist-port P] [--peer-timeout S] [--tp K] \\
        [--threads T] [--metrics-port P] [--log-level INFO]

Its own device also serves attention for the head groups the router places
there. The router calls Connect once with the attention workers' addresses;
the dense worker then forms the torch.distributed group (rank 0) with them.
"""
from __future__ import annotations

import argparse

from hetis import defaults
from hetis.mesh.flags import DenseWorkerConfig, add_worker_flags, from_args, positive_int


def parse(argv=None) -> DenseWorkerConfig:
    ap = argparse.ArgumentParser(prog="python -m services.dense_worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_flags(ap, default_port=defaults.DENSE_WORKER_PORT)
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M)")
    ap.add_argument("--dtype", default=defaults.DEFAULT_DTYPE, choices=defaults.DTYPE_NAMES)
    ap.add_argument("--weights", default="dense", choices=("dense", "gguf"),
                    help="dense: dequantise every weight to --dtype; gguf: keep the GGUF's Q4_0/Q4_1 "
                    "projections four-bit (int4 weight-only matmul, CPU; not with --tp)")
    ap.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
    ap.add_argument("--dist-port", type=int, default=0,
                    help="rendezvous port of the tensor channels (a TCPStore; 0: a free one)")
    ap.add_argument("--peer-timeout", type=float, default=10.0,
                    help="seconds an attention worker may take to answer before it is lost")
    ap.add_argument("--tp", type=positive_int, default=1,
                    help="tensor-parallel ranks: this worker runs as TP processes (on CUDA: "
                    "--device cuda:N and the next TP-1 devices), its weights and head groups "
                    "split among them (default 1)")
    return from_args(DenseWorkerConfig, ap.parse_args(argv))


def main(argv=None) -> None:
    cfg = parse(argv)
    from services.dense_worker.server import run
    run(cfg)


if __name__ == "__main__":
    main()
