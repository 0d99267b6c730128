"""Flags and start-up shared by the worker services."""
from __future__ import annotations

import argparse
import os
import socket

import torch


def add_common_flags(ap: argparse.ArgumentParser, default_port: int) -> None:
    from hetis.telemetry import DEFAULT_REDIS_URL
    ap.add_argument("--port", type=int, default=default_port, help="gRPC port (0: pick a free one)")
    ap.add_argument("--host", default="0.0.0.0", help="interface to bind")
    ap.add_argument("--advertise-host", default=None,
                    help="host name other services use to reach this one (default: this host's name)")
    ap.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                    help="Redis for registration and telemetry (env HETIS_REDIS_URL)")
    ap.add_argument("--worker-id", default=None, help="id in Redis (default: HOST:PORT)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("HETIS_THREADS", "0")),
                    help="torch intra-op threads (0: torch's default; env HETIS_THREADS)")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="Prometheus /metrics port (0: a free one; unset: off)")
    ap.add_argument("--log-level", default="INFO")


def apply_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def advertise(host: str | None) -> str:
    return host or socket.getfqdn()


def describe_device(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device
