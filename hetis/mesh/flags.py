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

# flag -> environment variable: every TLS setting can come from either, so `hetis up`,
# docker-compose and Kubernetes can hand them to every service the same way
TLS_FLAGS = {"tls_cert": "HETIS_TLS_CERT", "tls_key": "HETIS_TLS_KEY",
             "tls_client_ca": "HETIS_TLS_CLIENT_CA", "tls_ca": "HETIS_TLS_CA",
             "tls_client_cert": "HETIS_TLS_CLIENT_CERT", "tls_client_key": "HETIS_TLS_CLIENT_KEY"}


@dataclass
class Security:
    """One process's TLS files (flags, else environment) and tokens (environment only, so
    they never show in ``ps``). Every field unset: plaintext and no tokens, as before.

    As a server: ``tls_cert``/``tls_key`` turn TLS on; ``tls_client_ca`` also demands a
    client certificate signed by it (mTLS). As a client of other services: ``tls_ca``
    verifies their certificates; ``tls_client_cert``/``tls_client_key`` are presented to
    a server that demands one. Internal services (dense and attention workers, the
    allocator's admin calls) accept only callers holding ``$HETIS_CLUSTER_TOKEN`` when it
    is set; the router's public API takes its own ``--api-key``.
    """
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Security":
        sec = cls(**{f: getattr(args, f, None) for f in TLS_FLAGS})
        sec.server_tls(), sec.client_tls()  # a missing or mismatched file fails at start
        return sec

    @property
    def cluster_token(self) -> str | None:
        from hetis.security import cluster_token_from_env
        return cluster_token_from_env()

    def server_tls(self):
        """The TlsConfig of this process's gRPC servers, or None (plaintext)."""
        from hetis.security import TlsConfig
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return None
        tls = TlsConfig(cert=self.tls_cert, key=self.tls_key, ca=self.tls_client_ca)
        tls.server_credentials()  # checks the files now, naming the flag
        return tls

    def client_tls(self):
        """The TlsConfig of this process's calls to other services, or None (plaintext). A
        process serving TLS never calls in plaintext: without ``tls_ca`` it verifies its
        peers against the system's roots (publicly trusted certificates)."""
        from hetis.security import TlsConfig
        if not (self.tls_ca or self.tls_client_cert or self.tls_client_key or self.tls_cert):
            return None
        tls = TlsConfig(ca=self.tls_ca, client_cert=self.tls_client_cert,
                        client_key=self.tls_client_key)
        tls.channel_credentials()
        return tls

    def internal_channel(self, target: str):
        """A channel to an internal service: this process's client TLS, the cluster token."""
        from hetis.mesh.service import GRPC_OPTIONS
        from hetis.security import open_channel
        return open_channel(target, self.client_tls(), GRPC_OPTIONS, token=self.cluster_token)

    def internal_interceptors(self, exempt: tuple[str, ...] = ()) -> list:
        """Server interceptors of an internal service: the cluster token, when set."""
        from hetis.security import PUBLIC_METHODS, AuthInterceptor
        from hetis.security.auth import CLUSTER_TOKEN_MESSAGE
        token = self.cluster_token
        return ([AuthInterceptor(token, exempt=PUBLIC_METHODS + exempt, message=CLUSTER_TOKEN_MESSAGE)]
                if token else [])


def add_security_flags(ap: argparse.ArgumentParser) -> None:
    """The TLS flags every service takes (docs/security.md)."""
    import os
    g = ap.add_argument_group("TLS (each flag defaults to its environment variable)")
    helps = {"tls_cert": "serve TLS with this certificate (PEM)",
             "tls_key": "the private key of --tls-cert",
             "tls_client_ca": "demand client certificates signed by this CA (mTLS)",
             "tls_ca": "verify the services this one calls against this CA",
             "tls_client_cert": "client certificate to present when calling (mTLS)",
             "tls_client_key": "the private key of --tls-client-cert"}
    for name, env in TLS_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), default=os.environ.get(env) or None,
                       metavar="FILE", help=f"{helps[name]} (${env})")


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
    kv_cache_dtype: str = "auto"   # "int8": hetis/model/kv_store.py
    metrics_port: int | None = None
    log_level: str = "INFO"
    security: Security = field(default_factory=Security)

    @property
    def advertised(self) -> str:
        """The host name other services use to reach this one."""
        return self.advertise_host or socket.getfqdn()


@dataclass
class DenseWorkerConfig(WorkerConfig):
    model: str | None = None
    dtype: str = defaults.DEFAULT_DTYPE
    weights: str = "dense"      # "gguf": the GGUF's Q4 projections stay int4 (hetis/model/quant.py)
    block_size: int = 16
    dist_port: int = 0
    peer_timeout: float = 10.0
    tp: int = 1                 # tensor-parallel ranks (processes; hetis/mesh/tp.py)
    tp_rank: int = 0            # set for ranks 1.. by rank 0, never by hand
    tp_store: str = ""          # rank 0's rendezvous store, for ranks 1..


@dataclass
class RouterConfig:
    dense_worker: str = ""             # host:port[,host:port...]; more come from Redis
    dense_workers: int = 1             # how many dense workers to wait for before serving
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
    kv_headroom: int | None = None     # re-dispatch (EngineConfig): None = full reservation
    rebalance_threshold: float = 0.5
    kv_balance: bool = True
    max_move_tokens: int = 4096
    migrate_every: int = 0             # test-only: force a head-group move every N steps
    step_log: str | None = None        # one JSON line per step (hetis/sim/measured.py)
    max_prompt_chars: int = 0          # 0: 32 x max_model_len
    startup_timeout: float = 300.0
    metrics_port: int | None = None
    log_level: str = "INFO"
    http_port: int | None = None       # the OpenAI-compatible HTTP API (None: off)
    api_key: str | None = None         # guards the public APIs (None: open)
    served_model_name: str | None = None
    security: Security = field(default_factory=Security)


def from_args(cls, args: argparse.Namespace):
    """A config dataclass from the parsed flags of the same names (``security`` from the
    TLS flags; a bad TLS file ends the process with the flag's name). Fields no flag sets
    (internal ones, such as a tensor-parallel rank's) keep their defaults."""
    kw = {}
    for f in fields(cls):
        if f.name == "security":
            try:
                kw[f.name] = Security.from_args(args)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
        elif hasattr(args, f.name):
            kw[f.name] = getattr(args, f.name)
    return cls(**kw)


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


def positive_rate(s: str) -> float:
    """A request rate: > 0, or inf (everything at once)."""
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or inf (got {s})")
    return v


def api_key_arg(s: str) -> str:
    """``--api-key``: surrounding whitespace dropped (a key read from a file often ends in a
    newline); an empty key is refused, never taken to mean "open"."""
    if not s.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave the flag out for no key)")
    return s.strip()


def port_or_zero(s: str) -> int:
    """A port to bind: 1..65535, or 0 for a free one."""
    v = int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535 (got {s})")
    return v


def nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {s})")
    return v


def add_redispatch_flags(ap: argparse.ArgumentParser) -> None:
    """Re-dispatch (hetis/engine/redispatch.py): the router's and ``hetis up``'s flags."""
    ap.add_argument("--kv-headroom", type=nonneg_int, default=None, metavar="TOKENS",
                    help="admit a request reserving its current KV plus this many tokens per "
                    "head group, and relieve a full device by moving head groups (default: "
                    "reserve prompt + max_tokens, nothing ever runs short)")
    ap.add_argument("--rebalance-threshold", type=nonneg_float, default=0.5, metavar="THETA",
                    help="move a request off the slowest device when the predicted attention "
                    "time exceeds (1 + THETA) x the ideal; 0: off (default %(default)s)")
    ap.add_argument("--no-kv-balance", dest="kv_balance", action="store_false",
                    help="relieve a full device by preemption (recompute) only, never by moves")
    ap.add_argument("--max-move-tokens", type=positive_int, default=4096, metavar="N",
                    help="KV one step may migrate, tokens x head groups: larger balance and drain "
                    "moves are pre-copied over several steps (default %(default)s)")
    # test-only: every N steps move one head group (live migration without a reason)
    ap.add_argument("--migrate-every", type=nonneg_int, default=0, help=argparse.SUPPRESS)


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
    ap.add_argument("--kv-cache-dtype", choices=defaults.KV_CACHE_DTYPES, default="auto",
                    help="auto: the KV cache in the model's dtype; int8: int8 rows with a float32 "
                    "scale each, half of bfloat16's bytes per token (default auto)")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="Prometheus /metrics port (0: a free one; unset: off)")
    ap.add_argument("--log-level", default="INFO")
    add_security_flags(ap)


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
