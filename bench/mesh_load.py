"""Many concurrent streams against a local mesh: does the router hold them, and does
health stay fast?

    .venv/bin/python -m bench.mesh_load [--streams 32 512] [--max-tokens 16]
                                        [--attn-workers 2] [--label NAME] [--out FILE.json]
                                        [--kill-attn-after S]

Starts ``hetis up`` (a private Redis, attention workers, a dense worker, the router;
one torch thread each) as a child process, then for each ``--streams N`` opens N
Generate streams at once (grpc.aio, greedy, ``--max-tokens`` tokens each, prompts of
16-48 tokens) while a probe calls grpc.health.v1 Check every 50 ms. Reports per N:
completed and failed streams, TTFT p50/p99, output tokens/s, health-check latency
p50/p99/max during the load, and each service's peak RSS (VmHWM, after all runs).
Only the CLI and the public protos are used, so the same file measures an older tree
(run it from that tree's root with that tree's Python path).

``--kill-attn-after S``: S seconds into each run, ``kill -9`` the last attention
worker (restarted between runs) and report the recovery: seconds from the kill to the
next token any stream receives, and the longest pause of a stream across the kill.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc as pb_grpc

OUT = pathlib.Path(__file__).resolve().parent / "results" / "mesh_load.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(attn_workers: int, log_dir: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hetis.cli", "up", "--attn-workers", str(attn_workers),
                             "--port", str(port), "--threads", "1", "--log-dir", log_dir, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(f"  up: {line.rstrip()}", flush=True)
        if "Hetis is up" in line:
            return proc, f"127.0.0.1:{port}"
    raise RuntimeError(f"hetis up exited with {proc.wait()}; logs in {log_dir}")


def wait_all_alive(target: str, timeout: float = 180) -> None:
    """Until the router lists every worker alive (a restarted one has rejoined)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        while time.monotonic() < deadline:
            st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
            if st.workers and all(w.alive for w in st.workers):
                return
            time.sleep(1.0)
    raise RuntimeError("a worker did not come back")


def service_rss(up_pid: int) -> dict[str, float]:
    """Peak RSS (MiB) of every child of `hetis up`, by its service module."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != up_pid:
                continue
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = pathlib.Path(f"/proc/{pid}/status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        name = next((c.decode() for c in cmd if c.startswith(b"services.")), cmd[0].decode())
        if b"--worker-id" in cmd:
            name += ":" + cmd[cmd.index(b"--worker-id") + 1].decode()
        hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))
        out[name] = hwm / 1024
    return out


def attn_pid(up_pid: int, worker_id: str) -> int | None:
    for pid in os.listdir("/proc"):
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == up_pid and worker_id.encode() in cmd:
            return int(pid)
    return None


async def load(target: str, streams: int, max_tokens: int, seed: int = 0,
               kill: tuple[float, int] | None = None) -> dict:
    rng = random.Random(seed)
    ttft, tokens, errors = [], 0, []
    stamps: list[float] = []  # every token's arrival (perf_counter)
    gaps: list[tuple[float, float]] = []  # (previous token, next token) of each stream
    health_ms: list[float] = []
    done = asyncio.Event()
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as ch, \
            grpc.aio.insecure_channel(target) as hch:
        stub, hstub = pb_grpc.GenerationStub(ch), health_pb2_grpc.HealthStub(hch)

        async def one(i: int) -> None:
            nonlocal tokens
            ids = [rng.randrange(100, 40000) for _ in range(rng.randint(16, 48))]
            req = pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                ignore_eos=True))
            req.prompt_token_ids.ids.extend(ids)
            t0 = time.perf_counter()
            first, last = None, None
            try:
                async for c in stub.Generate(req, timeout=900):
                    now = time.perf_counter()
                    if first is None and c.token_ids:
                        first = now - t0
                    if c.token_ids:
                        stamps.append(now)
                        if last is not None:
                            gaps.append((last, now))
                        last = now
                    tokens += len(c.token_ids)
                ttft.append(first)
            except grpc.aio.AioRpcError as e:
                errors.append(e.code().name)

        async def probe() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    await hstub.Check(health_pb2.HealthCheckRequest(), timeout=60)
                    health_ms.append((time.perf_counter() - t0) * 1e3)
                except grpc.aio.AioRpcError:
                    health_ms.append(float("inf"))
                await asyncio.sleep(0.05)

        killed_at = None

        async def killer() -> None:
            nonlocal killed_at
            await asyncio.sleep(kill[0])
            os.kill(kill[1], signal.SIGKILL)
            killed_at = time.perf_counter()

        prober = asyncio.ensure_future(probe())
        if kill:
            asyncio.ensure_future(killer())
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - t0
        done.set()
        await prober
    # nearest-rank percentiles: a timed-out health check counts as inf, not as a NaN
    pct = lambda xs, q: float(np.percentile(xs, q, method="nearest")) if xs else None  # noqa: E731
    recovery = {}
    if kill and killed_at is not None:
        after = [t for t in stamps if t > killed_at]
        across = [b - a for a, b in gaps if a <= killed_at < b]
        recovery = {"killed_at_s": killed_at - t0,
                    "first_token_after_kill_s": (min(after) - killed_at) if after else None,
                    "longest_stream_pause_across_kill_s": max(across, default=None)}
    return {"streams": streams, "max_tokens": max_tokens, **recovery,
            "completed": len(ttft), "failed": len(errors),
            "errors": sorted(set(errors)), "wall_s": wall, "output_tok_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "health_checks": len(health_ms), "health_timeouts_60s": sum(h == float("inf") for h in health_ms),
            "health_p50_ms": pct(health_ms, 50),
            "health_p99_ms": pct(health_ms, 99), "health_max_ms": max(health_ms, default=None)}


def plot(data: dict, path: pathlib.Path) -> None:
    """One panel per metric, one bar group per stream count, one bar per labelled run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [("output_tok_s", "output tokens/s"), ("ttft_p99_s", "TTFT p99 (s)"),
               ("health_p99_ms", "health check p99 (ms, log)")]
    labels = list(data)
    counts = sorted({r["streams"] for d in data.values() for r in d["runs"]})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for ax, (key, title) in zip(axes, metrics):
        for j, label in enumerate(labels):
            by_n = {r["streams"]: r.get(key) for r in data[label]["runs"]}
            vals = [by_n.get(n) for n in counts]
            vals = [6e4 if v in (None, "inf") or v != v or v == float("inf") else v for v in vals]
            ax.bar([i + j * 0.8 / len(labels) for i in range(len(counts))], vals,
                   width=0.8 / len(labels), label=label)
        ax.set_xticks([i + 0.4 - 0.4 / len(labels) for i in range(len(counts))],
                      [f"{n} streams" for n in counts])
        ax.set_title(title)
        if key == "health_p99_ms":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("router under many concurrent streams (timed-out health checks drawn at 60 s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mesh_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--attn-workers", type=int, default=2)
    ap.add_argument("--label", default="current", help="name of this run in the JSON file")
    ap.add_argument("--out", default=str(OUT), help="JSON file; runs under other labels are kept")
    ap.add_argument("--kill-attn-after", type=float, default=None, metavar="S",
                    help="kill -9 the last attention worker S seconds into each run")
    args = ap.parse_args(argv)
    log_dir = tempfile.mkdtemp(prefix="hetis-mesh-load-")
    flags = ["--restart-workers"] if args.kill_attn_after is not None else []
    proc, target = start_cluster(args.attn_workers, log_dir, *flags)
    try:
        runs = []
        victim = f"attn-{args.attn_workers - 1}"
        for n in args.streams:
            print(f"{n} streams x {args.max_tokens} tokens ...", flush=True)
            kill = None
            if args.kill_attn_after is not None:
                wait_all_alive(target)
                pid = attn_pid(proc.pid, victim)
                if pid is None:
                    raise RuntimeError(f"{victim} is not running")
                kill = (args.kill_attn_after, pid)
            r = asyncio.run(load(target, n, args.max_tokens, kill=kill))
            print(json.dumps(r), flush=True)
            runs.append(r)
        rss = service_rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    cpu = "AVX512-BF16" if "avx512_bf16" in pathlib.Path("/proc/cpuinfo").read_text() else "AVX2"
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu, "cores": os.cpu_count(),
              "attn_workers": args.attn_workers, "runs": runs, "peak_rss_mib": rss}
    out = pathlib.Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2).replace("Infinity", '"inf"').replace("NaN", "null"))
    plot(data, out.with_suffix(".png"))
    print(f"peak RSS (MiB): {json.dumps(rss)}\nwrote {out} [{args.label}] and {out.with_suffix('.png')}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
