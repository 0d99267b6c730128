"""Flags and configs of the mesh services: argparse -> a config dataclass, once.

Each service's ``__main__`` builds its parser from these helpers, parses, and
hands the runtime a config dataclass; nothing below the ``__main__`` reads an
argparse Namespace. The flags are the services' contract (docs/mesh.md,
docker-compose.yml, deploy/k8s): rename nothing here without them.
"""
from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass, field, fields

from hetis import defaults


@dataclass
class WorkerConfig:
    """What every worker service is told (the attention worker needs nothing more)."""
    port: int
    host: str = "0.0.0.0"
    advertise_host: str | None = None
    redis_url: str = field(default_factory=defaults.default_redis_url)
    worker_id: str | None = None
    device: str = "cpu"
    threads: int = 0
    kv_tokens: int = 131072
    metrics_port: int | None = None
    log_level: str = "INFO"

    @property
    def advertised(self) -> str:
        """The host name other services use to reach this one."""
        return self.advertise_host or socket.getfqdn()


@dataclass
class DenseWorkerConfig(WorkerConfig):
    model: str | None = None
    dtype: str = defaults.DEFAULT_DTYPE
    block_size: int = 16
    dist_port: int = 0
    peer_timeout: float = 10.0


@dataclass
class RouterConfig:
    dense_worker: str
    port: int = defaults.ROUTER_PORT
    host: str = "0.0.0.0"
    redis_url: str = field(default_factory=defaults.default_redis_url)
    attn_workers: int = 0
    policy: str = defaults.DEFAULT_POLICY
    model: str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int = 2048
    max_queue: int = 1024
    max_prompt_chars: int = 0          # 0: 32 x max_model_len
    startup_timeout: float = 300.0
    metrics_port: int | None = None
    log_level: str = "INFO"


def from_args(cls, args: argparse.Namespace):
    """A config dataclass from the parsed flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {s})")
    return v


def nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {s})")
    return v


def port_number(s: str) -> int:
    v = int(s)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1..65535 (got {s})")
    return v


def add_worker_flags(ap: argparse.ArgumentParser, default_port: int) -> None:
    """The flags of WorkerConfig."""
    ap.add_argument("--port", type=int, default=default_port, help="gRPC port (0: pick a free one)")
    ap.add_argument("--host", default="0.0.0.0", help="interface to bind")
    ap.add_argument("--advertise-host", default=None,
                    help="host name other services use to reach this one (default: this host's name)")
    ap.add_argument("--redis-url", default=defaults.default_redis_url(),
                    help="Redis for registration and telemetry (env HETIS_REDIS_URL)")
    ap.add_argument("--worker-id", default=None, help="id in Redis (default: HOST:PORT)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=nonneg_int, default=defaults.default_threads(),
                    help="torch intra-op threads (0: torch's default; env HETIS_THREADS)")
    ap.add_argument("--kv-tokens", type=positive_int, default=131072,
                    help="KV capacity of this device in tokens x head groups (default 131072)")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="Prometheus /metrics port (0: a free one; unset: off)")
    ap.add_argument("--log-level", default="INFO")


def apply_threads(n: int) -> None:
    if n > 0:
        import torch
        torch.set_num_threads(n)


def describe_device(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def check_device(device: str) -> None:
    """SystemExit with the flag's name when ``--device`` cannot be used here."""
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here")
