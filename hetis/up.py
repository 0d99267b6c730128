"""`hetis up`: a local cluster (private Redis, attention workers, dense workers,
the router) as child processes of this one, stopped together.

``service_commands`` is the single place the service command lines are built;
docker-compose.yml runs the same ones (tests/test_compose.py keeps them equal).
"""
from __future__ import annotations

import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from hetis.mesh.flags import TLS_FLAGS
from hetis.mesh.redisproc import RedisProcess, free_port, redacted

LOCAL_HOST = "127.0.0.1"
CLUSTER_VARS = ("HETIS_REDIS_URL", "HETIS_API_KEY", "HETIS_CLUSTER_TOKEN", *TLS_FLAGS.values())
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL (services drain for 5 s)


def service_commands(args, ports: dict[str, int] | None = None, host: str = LOCAL_HOST,
                     bind: str | None = None) -> list[tuple[str, list[str]]]:
    """(name, argv) of every service, in start order: attn-0.., dense-0.., router.

    ``args`` carries attn_workers, port (the router's), redis_url, model, dtype,
    policy and threads (``hetis up``'s flags), and optionally dense_workers, tp, dense_kv_tokens,
    attn_kv_tokens, kv_cache_dtype (every worker's), host and http_port. Secrets (the API key) never go on a
    command line, where ``ps`` shows them: they travel in the environment. ``ports`` maps worker names to their ports (missing
    ones get free ports); ``host`` is how services reach each other (127.0.0.1
    locally, service names in docker-compose). ``bind``: the interface internal
    services bind (``hetis up``: 127.0.0.1, the router ``args.host``); None keeps
    every service's default (all interfaces, as containers need).
    """
    ports = dict(ports or {})
    py = sys.executable
    # a URL with a password stays off the command line: the children read $HETIS_REDIS_URL
    redis_flag = [] if "@" in args.redis_url else ["--redis-url", args.redis_url]
    model = ["--model", args.model] if args.model else []
    internal = ["--host", bind] if bind else []

    kv_dtype = getattr(args, "kv_cache_dtype", "auto") or "auto"

    def kv(name):
        v = getattr(args, name, None)
        return (["--kv-tokens", str(v)] if v else []) + \
            (["--kv-cache-dtype", kv_dtype] if kv_dtype != "auto" else [])
    cmds = []
    for i in range(args.attn_workers):
        name = f"attn-{i}"
        port = ports.setdefault(name, free_port())
        cmds.append((name, [py, "-m", "services.attn_worker", "--port", str(port),
                            *redis_flag, "--worker-id", name,
                            "--advertise-host", host, "--threads", str(args.threads),
                            "--metrics-port", "0", *internal, *kv("attn_kv_tokens")]))
    dense = []
    tp = ["--tp", str(args.tp)] if (getattr(args, "tp", 1) or 1) > 1 else []
    for i in range(max(1, getattr(args, "dense_workers", 1) or 1)):
        name = f"dense-{i}"
        port = ports.setdefault(name, free_port())
        dense.append(f"{host}:{port}")
        cmds.append((name, [py, "-m", "services.dense_worker", "--port", str(port),
                            *redis_flag, "--worker-id", name, *model,
                            "--dtype", args.dtype, "--advertise-host", host,
                            "--threads", str(args.threads), "--metrics-port", "0", *internal,
                            *kv("dense_kv_tokens"), *tp,
                            *(["--weights", args.weights] if getattr(args, "weights", "dense") != "dense"
                              else [])]))
    cmds.append(("router", [py, "-m", "services.router", "--port", str(args.port),
                            *redis_flag, *model,
                            "--dense-worker", ",".join(dense), "--dense-workers", str(len(dense)),
                            "--attn-workers", str(args.attn_workers),
                            "--policy", args.policy, "--metrics-port", "0",
                            *redispatch_flags(args),
                            *(["--host", args.host] if bind else []),
                            *(["--http-port", str(args.http_port)]
                              if getattr(args, "http_port", None) is not None else [])]))
    return cmds


def redispatch_flags(args) -> list[str]:
    """The router's re-dispatch flags from ``hetis up``'s (hetis/mesh/flags.py); defaults
    stay off the command line."""
    out = []
    if getattr(args, "kv_headroom", None) is not None:
        out += ["--kv-headroom", str(args.kv_headroom)]
    if getattr(args, "rebalance_threshold", 0.5) != 0.5:
        out += ["--rebalance-threshold", str(args.rebalance_threshold)]
    if not getattr(args, "kv_balance", True):
        out.append("--no-kv-balance")
    if getattr(args, "max_move_tokens", 4096) != 4096:
        out += ["--max-move-tokens", str(args.max_move_tokens)]
    if getattr(args, "migrate_every", 0):
        out += ["--migrate-every", str(args.migrate_every)]
    return out


def port_of(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


class ChildDied(RuntimeError):
    def __init__(self, name: str, returncode: int, tail: str):
        self.name, self.returncode, self.tail = name, returncode, tail
        super().__init__(f"{name} exited with status {returncode}")


def _die_with_parent():  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM us if `hetis up` is killed


try:  # loaded before any fork: dlopen in a forked child is not safe
    import ctypes
    _LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
except OSError:
    _LIBC = None


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: str
    proc: subprocess.Popen | None = None
    healthy: bool = False

    @property
    def address(self) -> str:
        """Where to reach it: its --host unless that is every interface, else loopback."""
        host = self.argv[self.argv.index("--host") + 1] if "--host" in self.argv else LOCAL_HOST
        return f"{LOCAL_HOST if host in ('0.0.0.0', '::', '') else host}:{port_of(self.argv)}"

    def tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCluster:
    """Child processes, each logging to ``log_dir/NAME.log``; ``stop()`` leaves none behind."""
    commands: list[tuple[str, list[str]]]
    log_dir: str
    children: list[Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)   # added to every child's environment

    def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        for name, argv in self.commands:
            child = Child(name, argv, os.path.join(self.log_dir, f"{name}.log"))
            self._spawn(child, "wb")
            self.children.append(child)

    def _spawn(self, child: Child, mode: str) -> None:
        # secrets and TLS settings of this shell (say, a sourced cluster.env of another
        # cluster) are not inherited: the children get exactly the ones set for them
        inherited = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
        env = dict(inherited, PYTHONUNBUFFERED="1", **self.env)
        with open(child.log_path, mode) as log:
            # own session: a terminal's Ctrl-C reaches only us, and we stop children in order
            child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                          preexec_fn=_die_with_parent if _LIBC else None)

    def restart(self, child: Child) -> None:
        """Start a child that exited again, with the same command (its log goes on)."""
        self._spawn(child, "ab")

    def forget(self, child: Child) -> None:
        """Stop watching a child that exited (the mesh goes on without it)."""
        child.proc = None

    def check_alive(self) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                raise ChildDied(c.name, c.proc.returncode, c.tail())

    def wait_ready(self, router: str, attn_workers: int, timeout: float,
                   progress=lambda msg: None, tls_ca: str | None = None,
                   api_key: str | None = None) -> None:
        """Until every child is SERVING and the router lists ``attn_workers`` live attention
        workers. Raises ChildDied if one exits, TimeoutError naming the laggards."""
        from hetis.client import Client, HetisError
        from hetis.healthcheck import check
        deadline = time.monotonic() + timeout
        seen = -1
        with Client(router, retries=0, api_key=api_key, tls_ca=tls_ca) as client:
            while True:
                self.check_alive()
                for c in self.children:
                    if not c.healthy and check(c.address, timeout=1.0, tls_ca=tls_ca) == "SERVING":
                        c.healthy = True
                        progress(f"{c.name} serving at {c.address}")
                if all(c.healthy for c in self.children):
                    try:
                        st = client.cluster_status(timeout=2.0)
                        seen = sum(1 for w in st["workers"] if w["kind"] == "attention" and w["alive"])
                    except HetisError:
                        seen = -1
                    if seen >= attn_workers:
                        return
                if time.monotonic() > deadline:
                    waiting = [c.name for c in self.children if not c.healthy]
                    why = (f"not serving: {', '.join(waiting)}" if waiting else
                           f"the router sees {max(seen, 0)} of {attn_workers} attention workers")
                    raise TimeoutError(f"cluster not ready after {timeout:.0f}s ({why})")
                time.sleep(0.5)

    def watch(self, poll: float = 0.5) -> ChildDied:
        """Block until a child exits; return what happened."""
        while True:
            try:
                self.check_alive()
            except ChildDied as e:
                return e
            time.sleep(poll)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every child (router first), SIGKILL what is left after ``grace`` seconds."""
        live = [c.proc for c in reversed(self.children) if c.proc and c.proc.poll() is None]
        for p in live:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def secure(args, log_dir: str) -> dict[str, str]:
    """The environment that secures a local cluster, from ``--api-key`` and ``--tls``.

    ``--tls``: a private CA and a certificate for this host's names in ``log_dir/tls``;
    every service serves TLS with it and trusts the CA. Either flag also makes a cluster
    token: the internal services then accept only callers holding it.
    """
    env: dict[str, str] = {}
    if getattr(args, "api_key", None):
        env["HETIS_API_KEY"] = args.api_key
    if getattr(args, "tls", False):
        from hetis.security import make_cluster_pki
        hosts = ["localhost", LOCAL_HOST, socket.gethostname()]
        if args.host not in ("0.0.0.0", "::", *hosts):
            hosts.append(args.host)
        pki = make_cluster_pki(os.path.join(log_dir, "tls"), hosts=hosts)
        env.update(HETIS_TLS_CERT=str(pki.server_cert), HETIS_TLS_KEY=str(pki.server_key),
                   HETIS_TLS_CA=str(pki.ca))
    if env:
        from hetis.security import generate_token
        env["HETIS_CLUSTER_TOKEN"] = generate_token()
    return env


def write_env_file(log_dir: str, env: dict[str, str]) -> str:
    """``log_dir/cluster.env`` (mode 0600): the cluster's settings, secrets included, as
    shell assignments, so a worker added by hand (or a client) can source them."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "cluster.env")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run_up(args, out=print, err=lambda msg: print(msg, file=sys.stderr)) -> int:
    """The whole of `hetis up`: start, wait until ready, run until Ctrl-C/SIGTERM, stop."""
    for flag, port in (("--port", args.port), ("--http-port", getattr(args, "http_port", None))):
        if port is not None and not _port_free(port):
            err(f"hetis up: port {port} is in use (pick another with {flag})")
            return 1
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="hetis-up-")
    previous = signal.signal(signal.SIGTERM, _terminate)
    redis = cluster = None
    try:
        if args.redis_url is None:  # a private one, with a password of its own
            redis = RedisProcess(password=secrets.token_urlsafe(24))
            args.redis_url = redis.url
        env = {"HETIS_REDIS_URL": args.redis_url, **secure(args, log_dir)}
        env_file = write_env_file(log_dir, env)
        out(f"redis at {redacted(args.redis_url)}; settings in {env_file} (add an attention worker "
            f"at any time: set -a; . {env_file}; python -m services.attn_worker --advertise-host "
            f"{LOCAL_HOST} --port 0)")
        cluster = LocalCluster(service_commands(args, bind=LOCAL_HOST), log_dir, env=env)
        cluster.start()
        out(f"starting {len(cluster.children)} services (logs in {log_dir})")
        router = cluster.children[-1].address
        cluster.wait_ready(router, args.attn_workers, args.startup_timeout, progress=out,
                           tls_ca=env.get("HETIS_TLS_CA"), api_key=env.get("HETIS_API_KEY"))
        out(f"Hetis is up: router at {router}  (HETIS_TARGET={router}; Ctrl-C stops)")
        if "HETIS_TLS_CA" in env or "HETIS_API_KEY" in env:
            out(f"clients: set -a; . {env_file}  (HETIS_TLS_CA and HETIS_API_KEY for the SDK, "
                "the CLI and the openai client's key)")
        if getattr(args, "http_port", None) is not None:
            host = router.rsplit(":", 1)[0]
            scheme = "https" if "HETIS_TLS_CERT" in env else "http"
            out(f"OpenAI-compatible API at {scheme}://{host}:{args.http_port}/v1"
                + ("  (Authorization: Bearer $HETIS_API_KEY)" if "HETIS_API_KEY" in env else ""))
        while True:
            died = cluster.watch()
            child = next(c for c in cluster.children if c.name == died.name)
            restart = getattr(args, "restart_workers", False)
            others = [c for c in cluster.children if c is not child and c.name.startswith("dense-")]
            if died.name == "router" or (died.name.startswith("dense-") and not others
                                         and not restart):  # nothing left to serve: the end
                err(f"hetis up: {died} -- last lines of {died.name}.log:\n{died.tail}")
                return 1
            err(f"hetis up: {died}; the mesh goes on without it (the router recomputes its "
                f"sequences elsewhere) -- last lines of {died.name}.log:\n{died.tail}")
            if restart:
                cluster.restart(child)
                out(f"restarted {died.name}; it rejoins the mesh once it is up")
            else:
                cluster.forget(child)
    except ChildDied as e:
        err(f"hetis up: {e} during start-up -- last lines of {e.name}.log:\n{e.tail}")
        return 1
    except TimeoutError as e:
        err(f"hetis up: {e}; logs in {log_dir}")
        return 1
    except (RuntimeError, OSError) as e:  # e.g. redis-server missing, a log dir not writable
        err(f"hetis up: {e}")
        return 1
    except KeyboardInterrupt:
        out("stopping")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if cluster is not None:
                cluster.stop()
            if redis is not None:
                redis.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
