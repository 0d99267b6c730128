"""A real local mesh for integration tests: redis-server, attention workers, a
dense worker and a router, each its own process talking gRPC and gloo."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hetis.redisproc import RedisProcess, free_port


def healthy(addr: str) -> bool:
    try:
        with grpc.insecure_channel(addr) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class Cluster:
    def __init__(self, attn_workers: int = 0, policy: str = "hetis", dtype: str = "float32",
                 router_args: tuple[str, ...] = (), log_dir: str | None = None):
        self.redis = RedisProcess()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.log_dir = log_dir or "/tmp"
        env = dict(os.environ, HETIS_THREADS="1", PYTHONUNBUFFERED="1")
        py = [sys.executable, "-m"]
        common = ["--redis-url", self.redis.url, "--advertise-host", "127.0.0.1"]
        self.attn_addrs = []
        try:
            for i in range(attn_workers):
                port = free_port()
                self.attn_addrs.append(f"127.0.0.1:{port}")
                self._start(f"attn-{i}", py + ["services.attn_worker", "--port", str(port),
                                               "--worker-id", f"attn-{i}", *common], env)
            dport = free_port()
            self.dense_addr = f"127.0.0.1:{dport}"
            self._start("dense-0", py + ["services.dense_worker", "--port", str(dport),
                                         "--worker-id", "dense-0", "--dtype", dtype, *common], env)
            rport = free_port()
            self.target = f"127.0.0.1:{rport}"
            self._start("router", py + ["services.router", "--port", str(rport), "--redis-url",
                                        self.redis.url, "--dense-worker", self.dense_addr,
                                        "--attn-workers", str(attn_workers), "--policy", policy,
                                        *router_args], env)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, argv: list[str], env: dict) -> None:
        log = open(os.path.join(self.log_dir, f"hetis-test-{name}-{os.getpid()}.log"), "w")
        self.procs.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)))

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log(name)[-3000:]}")
            if healthy(self.target):
                return
            time.sleep(0.5)
        raise TimeoutError("cluster did not become healthy:\n" +
                           "\n".join(f"--- {n}\n{self.log(n)[-1500:]}" for n, _ in self.procs))

    def log(self, name: str) -> str:
        with open(os.path.join(self.log_dir, f"hetis-test-{name}-{os.getpid()}.log")) as f:
            return f.read()

    def proc(self, name: str) -> subprocess.Popen:
        return dict(self.procs)[name]

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.redis.stop()
