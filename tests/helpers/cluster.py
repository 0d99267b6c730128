"""A real local mesh for integration tests: redis-server, attention workers, a
dense worker and a router, each its own process talking gRPC and gloo.

The command lines are `hetis up`'s own (hetis.up.service_commands)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from hetis.mesh.redisproc import RedisProcess, free_port
from hetis.up import LocalCluster, service_commands


class Cluster:
    def __init__(self, attn_workers: int = 0, policy: str = "hetis", dtype: str = "float32",
                 router_args: tuple[str, ...] = (), dense_args: tuple[str, ...] = (),
                 timeout: float = 240, dense_workers: int = 1, tp: int = 1,
                 kv_cache_dtype: str = "auto"):
        os.environ.setdefault("HETIS_THREADS", "1")
        self.redis = RedisProcess()
        args = argparse.Namespace(attn_workers=attn_workers, port=free_port(), redis_url=self.redis.url,
                                  model=None, dtype=dtype, policy=policy, threads=1,
                                  dense_workers=dense_workers, tp=tp, kv_cache_dtype=kv_cache_dtype)
        cmds = service_commands(args)
        cmds[-1][1].extend(router_args)
        for name, argv in cmds:
            if name.startswith("dense-"):
                argv.extend(dense_args)
        self.target = f"127.0.0.1:{args.port}"
        self.log_dir = tempfile.mkdtemp(prefix="hetis-test-")
        self.local = LocalCluster(cmds, self.log_dir)
        self.attn_addrs = [f"127.0.0.1:{argv[argv.index('--port') + 1]}"
                           for name, argv in cmds if name.startswith("attn")]
        try:
            self.local.start()
            self.local.wait_ready(self.target, attn_workers, timeout)
        except BaseException as e:
            tails = "\n".join(f"--- {c.name}\n{c.tail(30)}" for c in self.local.children)
            self.stop()
            raise RuntimeError(f"cluster failed to start: {e}\n{tails}") from e

    def proc(self, name: str):
        return next(c.proc for c in self.local.children if c.name == name)

    def stop(self) -> None:
        self.local.stop()
        self.redis.stop()


def start_hetis_up(args: list[str], until: str, env: dict | None = None,
                   timeout: float = 240) -> tuple[subprocess.Popen, list[str]]:
    """`hetis up ARGS` as a child process, its output read until a line contains ``until``
    (asserted, with the output so far as the message); returns the process and the lines."""
    env = dict(os.environ, HETIS_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.Popen([sys.executable, "-m", "hetis.cli", "up", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if until in line:
            return p, lines
    p.kill()
    raise AssertionError(f"hetis up never printed {until!r}:\n" + "".join(lines))


def stream_tokens(stub, prompt_ids: list[int], sampling: dict, started=None) -> list[int]:
    """A Generate stream's token ids; after its third chunk it waits on ``started`` (a
    barrier: a fault is injected once every stream is under way)."""
    from hetis.v1 import generation_pb2 as pb
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    req.prompt_token_ids.ids.extend(prompt_ids)
    toks = []
    for n, chunk in enumerate(stub.Generate(req, timeout=600)):
        toks += chunk.token_ids
        if n == 2 and started is not None:
            started.wait(120)
    return toks
