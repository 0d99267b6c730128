"""Several dense workers and tensor-parallel dense workers, measured on this machine.

    .venv/bin/python -m bench.dense_scaling [--quick] [--dtype D] [--attn-workers N]
                                            [--batch B] [--context C] [--steps N]

1. data parallel: a local mesh (``hetis up``'s machinery, one torch thread per
   service, N attention workers, policy hetis) with 1, then 2 dense workers, each
   running the ``make bench`` workload (bench.run_all.workload_flags) through
   ``hetis bench``: output tok/s of each and their ratio.
2. tensor parallel: decode steps of B sequences of C tokens of context (after their
   prefill), on one process with the whole model and on two processes (one thread
   each) with the model sharded (hetis/model/tp.py) over a gloo group: the step
   time of each and the share of TP=2's step spent in its all-reduces.

Writes bench/results/dense_scaling.{json,png}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import tempfile
import time

from bench.run_all import OUT, bench, start_mesh, workload_flags


# ------------------------------------------------------------------ 1. data parallel
def data_parallel(quick: bool, dtype: str, attn_workers: int) -> dict:
    res = {}
    for n in (1, 2):
        log_dir = tempfile.mkdtemp(prefix=f"hetis-bench-dp{n}-")
        print(f"\nstarting a mesh with {n} dense worker(s), {attn_workers} attention workers "
              f"(logs in {log_dir})", flush=True)
        redis, cluster, router = start_mesh(1, log_dir, dtype, attn_workers, dense_workers=n)
        try:
            r = bench(["--target", router, "--threads", "1", *workload_flags(quick)])
        finally:
            cluster.stop()
            redis.stop()
        res[f"dense_workers_{n}"] = {k: r[k] for k in ("output_throughput", "num_prompts",
                                                       "completed", "ttft_ms", "tpot_ms")
                                     if k in r}
    res["dp2_vs_dp1"] = (res["dense_workers_2"]["output_throughput"]
                         / max(res["dense_workers_1"]["output_throughput"], 1e-12))
    return res


# ------------------------------------------------------------------ 2. tensor parallel
def _steps(batch: int, context: int, n: int, groups: int, block_size: int):
    """A prefill of ``batch`` sequences of ``context`` tokens, then ``n`` decode steps."""
    import torch

    from hetis.engine.block_manager import cdiv
    from hetis.engine.sampling import SamplingParams
    from hetis.engine.step import AttnItem, Step, StepChunk
    greedy = SamplingParams(temperature=0)
    nb = cdiv(context + n, block_size)
    blocks = {(s, g): list(range((s * groups + g) * nb, (s * groups + g + 1) * nb))
              for s in range(batch) for g in range(groups)}
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 20000, (batch, context), generator=gen).tolist()
    yield Step([StepChunk(s, 0, prompts[s], True, greedy) for s in range(batch)],
               [[AttnItem(s, g, 0, context, blocks[s, g]) for s in range(batch) for g in range(groups)]])
    for i in range(n):
        pos = context + i
        yield Step([StepChunk(s, pos, [1000 + i], True, greedy) for s in range(batch)],
                   [[AttnItem(s, g, pos, 1, blocks[s, g]) for s in range(batch) for g in range(groups)]])


def _rank(rank: int, world: int, port: int, dtype: str, batch: int, context: int, n: int, out):
    import torch
    import torch.distributed as dist

    from hetis.engine.block_manager import cdiv
    from hetis.model.attention import AttentionBackend
    from hetis.model.dense import DenseModel, parse_dtype
    from hetis.model.executor import Executor
    from hetis.model.loader import load
    from hetis.model.tp import shard
    torch.set_num_threads(1)
    dt = parse_dtype(dtype)
    cfg, sd, _ = load(None, dt)
    model = DenseModel(cfg, sd, dt)
    reduce_s = [0.0]
    groups = None
    if world > 1:
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0,
                              timeout=datetime.timedelta(seconds=300))
        pg = dist.ProcessGroupGloo(dist.PrefixStore("tp", store), rank, world,
                                   datetime.timedelta(seconds=300))

        def all_reduce(t):
            t0 = time.perf_counter()
            pg.allreduce([t]).wait()
            reduce_s[0] += time.perf_counter() - t0
            return t
        groups = shard(model, rank, world, all_reduce)
    bs = 16
    blocks = batch * cfg.num_groups * cdiv(context + n, bs)
    backend = AttentionBackend(cfg.num_layers, blocks, bs, cfg.head_dim, cfg.q_per_group, dt)
    ex = Executor(model, [backend], groups)
    times = []
    with torch.inference_mode():
        for i, step in enumerate(_steps(batch, context, n, cfg.num_groups, bs)):
            if i == 1:
                reduce_s[0] = 0.0  # the decode steps only
            t0 = time.perf_counter()
            ex.execute(step)
            if i:
                times.append(time.perf_counter() - t0)
    if rank == 0:
        times.sort()
        out.put({"step_ms_median": 1e3 * times[len(times) // 2], "step_ms_mean": 1e3 * sum(times) / len(times),
                 "all_reduce_ms_per_step": 1e3 * reduce_s[0] / len(times)})


def tensor_parallel(dtype: str, batch: int, context: int, n: int) -> dict:
    from hetis.mesh.redisproc import free_port
    ctx = mp.get_context("spawn")
    res = {"batch": batch, "context": context, "decode_steps": n, "threads_per_rank": 1}
    for world in (1, 2):
        print(f"\nTP={world}: {n} decode steps of {batch} sequences at context {context}", flush=True)
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, dtype, batch, context, n, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        r = q.get(timeout=1800)
        for p in procs:
            p.join(60)
        r["all_reduce_share"] = r["all_reduce_ms_per_step"] / r["step_ms_median"]
        res[f"tp{world}"] = r
        print(json.dumps(r), flush=True)
    res["tp2_vs_tp1_step"] = res["tp2"]["step_ms_median"] / res["tp1"]["step_ms_median"]
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    dp = res["data_parallel"]
    a.bar(["1 dense worker", "2 dense workers"], [dp["dense_workers_1"]["output_throughput"],
                                                  dp["dense_workers_2"]["output_throughput"]])
    a.set_ylabel("output tok/s")
    a.set_title("data parallel (make-bench workload)")
    tp = res["tensor_parallel"]
    names = ["TP=1", "TP=2"]
    step = [tp["tp1"]["step_ms_median"], tp["tp2"]["step_ms_median"]]
    red = [0.0, tp["tp2"]["all_reduce_ms_per_step"]]
    b.bar(names, [s - r for s, r in zip(step, red)], label="compute")
    b.bar(names, red, bottom=[s - r for s, r in zip(step, red)], label="all-reduce")
    b.set_ylabel("decode step, ms")
    b.set_title(f"tensor parallel (batch {tp['batch']}, context {tp['context']})")
    b.legend()
    fig.suptitle(res["machine"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dense_scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 requests of 32 output tokens")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attn-workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-dp", action="store_true", help="only the tensor-parallel part")
    args = ap.parse_args(argv)
    import platform

    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{cpu}, {mp.cpu_count()} cores, torch CPU capability "
                      f"{torch.backends.cpu.get_cpu_capability()}", "dtype": args.dtype}
    if not args.skip_dp:
        res["data_parallel"] = data_parallel(args.quick, args.dtype, args.attn_workers)
    res["tensor_parallel"] = tensor_parallel(args.dtype, args.batch, args.context, args.steps)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "dense_scaling.json", "w") as f:
        json.dump(res, f, indent=2)
    if "data_parallel" in res:
        plot(res, str(OUT / "dense_scaling.png"))
    print(json.dumps({k: v for k, v in res.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
