"""Two test hosts on one machine: host A is this network namespace, host B a network
namespace of its own, joined by a veth pair with an address on each end and shaped with
tbf (netem is not available on these machines). Processes on B are started with
``ip netns exec``. ``cut()`` takes the link down (a partition: packets vanish, no
connection is reset), ``heal()`` brings it back. ``close()`` (also on failure, from the
fixture) kills B's processes and deletes the namespace, which deletes the veth pair.

:class:`Across` runs a mesh over them: Redis, the dense worker and the router on A,
attention workers on B (bench/hosts.py uses it too).

Needs root (CI runs as root) and iproute2; :func:`available` says whether it can run.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import tempfile

import grpc

from hetis.mesh.redisproc import RedisProcess, free_port
from hetis.up import LocalCluster, service_commands
from hetis.v1 import worker_pb2, worker_pb2_grpc

_ids = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> str | None:
    """None when test hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    name = f"hetis-probe-{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode:
        return f"cannot make a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class HostPair:
    """Host A (here) at ``a``, host B (namespace ``ns``) at ``b``, on a /24 of their own."""

    def __init__(self, rate: str = "1gbit"):
        k = (os.getpid() * 7 + next(_ids)) % 250 + 1
        self.ns = f"hetis-b-{os.getpid()}-{k}"
        self.a_if, self.b_if = f"hta{k}", f"htb{k}"
        self.a, self.b = f"10.77.{k}.1", f"10.77.{k}.2"
        self.procs: list[subprocess.Popen] = []
        try:
            _ip("netns", "add", self.ns)
            _ip("link", "add", self.a_if, "type", "veth", "peer", "name", self.b_if)
            _ip("link", "set", self.b_if, "netns", self.ns)
            _ip("addr", "add", f"{self.a}/24", "dev", self.a_if)
            _ip("link", "set", self.a_if, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.b}/24", "dev", self.b_if)
            _ip("-n", self.ns, "link", "set", self.b_if, "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            self.shape(rate, "add")
        except BaseException:
            self.close()
            raise

    def shape(self, rate: str, op: str = "change") -> None:
        """Both ends of the link at ``rate`` (tbf), e.g. "1gbit", "100mbit"."""
        qdisc = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
        subprocess.run(["tc", "qdisc", op, "dev", self.a_if, *qdisc], check=True)
        subprocess.run(["ip", "netns", "exec", self.ns, "tc", "qdisc", op, "dev", self.b_if,
                        *qdisc], check=True)

    def on_b(self, argv: list[str]) -> list[str]:
        """``argv`` as a command that runs on host B."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def cut(self) -> None:
        """Partition: B is unreachable (no reset: its packets just vanish)."""
        _ip("link", "set", self.a_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.a_if, "up")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        # anything still running in B (a worker started by someone else) goes with it
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", self.ns, check=False)
        _ip("link", "del", self.a_if, check=False)


class Across:
    """Redis, the dense worker and the router on A; ``attn_workers`` attention workers on B."""

    def __init__(self, hosts: HostPair, attn_workers: int = 2, policy: str = "round-robin",
                 dense_args: tuple[str, ...] = ()):
        assert not any(k.startswith(("GLOO_", "NCCL_")) for k in os.environ), "hand-set env"
        self.hosts = hosts
        self.redis = RedisProcess(host=hosts.a)
        ns = argparse.Namespace(attn_workers=attn_workers, port=free_port(), redis_url=self.redis.url,
                                model=None, dtype="float32", policy=policy, threads=1)
        cmds = []
        for name, argv in service_commands(ns, host=hosts.a):
            if name.startswith("attn-"):
                argv = list(argv)
                argv[argv.index("--advertise-host") + 1] = hosts.b
                argv = hosts.on_b(argv + ["--host", hosts.b])
            elif name.startswith("dense-"):
                argv = list(argv) + list(dense_args)
            cmds.append((name, argv))
        self.target = f"127.0.0.1:{ns.port}"
        self.local = LocalCluster(cmds, tempfile.mkdtemp(prefix="hetis-hosts-"))
        try:
            self.local.start()
            self.local.wait_ready(self.target, attn_workers, timeout=240)
        except BaseException as e:
            tails = "\n".join(f"--- {c.name}\n{c.tail(30)}" for c in self.local.children)
            self.stop()
            raise RuntimeError(f"mesh across hosts failed to start: {e}\n{tails}") from e
        self.attn = [c.address for c in self.local.children if c.name.startswith("attn-")]

    def attn_steps(self) -> list[int]:
        out = []
        for addr in self.attn:
            with grpc.insecure_channel(addr) as ch:
                out.append(worker_pb2_grpc.AttentionWorkerStub(ch).Stats(
                    worker_pb2.StatsRequest(), timeout=10).steps)
        return out

    def stop(self) -> None:
        self.local.stop()
        self.redis.stop()
