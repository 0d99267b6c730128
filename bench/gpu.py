"""Hetis on a GPU: exactness, in-process throughput, and the heterogeneous mesh.

    python -m bench.gpu [--device cuda] [--quick] [--out bench/results/gpu.json]

Run on a machine with a CUDA GPU (the project's CI has none: this is how the
GPU figures in the README were taken; on a CPU ``--device cpu`` runs the same
code paths as a smoke test).

1. Exactness: ``hetis.LLM(device=DEV)`` in float32 (TF32 off) against the same
   engine on the CPU: greedy tokens of six prompts, and seeded sampling.
2. In-process throughput in bfloat16: the ``make bench`` workload (64 requests,
   prompts of 64-512 random tokens, 128 output tokens, all at once) and 256
   requests with ``max_num_seqs=256``; one stream (256-token prompt, 128 tokens).
3. The heterogeneous mesh: ``hetis up``'s services with the dense worker on
   DEV holding KV for about 16 requests (``--kv-tokens 16384``) and two attention
   workers on the CPU (gloo channels: q/k/v cross from the GPU to the host and
   back every layer), policy ``hetis``: float32 tokens against (1), then the
   bfloat16 workload of (2); and the same with 0 attention workers and the dense
   worker's default KV (all of it on DEV).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from types import SimpleNamespace

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "The history of the printing press begins in the fifteenth century, when ",
           "Explain why the sky is blue.", "A list of prime numbers: 2, 3, 5, 7,"]


def workload(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(64, 513, (n,), generator=g).tolist()
    return [torch.randint(100, 20000, (k,), generator=g).tolist() for k in lens]


def tokens(llm, prompts, sp) -> list[list[int]]:
    return [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp)]


def throughput(llm, prompts, out_len: int) -> dict:
    from hetis import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(max_tokens=4))  # warm-up
    sync()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    sync()
    wall = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return {"requests": len(prompts), "output_tokens": n, "wall_s": wall, "output_tok_s": n / wall}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one_stream(llm, prompt, n: int) -> dict:
    from hetis import SamplingParams
    from hetis.engine.serving import ServingLoop
    loop = ServingLoop(llm.engine, 16).start()
    try:
        t0 = time.perf_counter()
        q = loop.submit("one", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), None)
        times = []
        while True:
            o = q.get(timeout=600)
            assert not isinstance(o, Exception), o
            if o.new_token_ids:
                times.append(time.perf_counter())
            if o.finished:
                break
    finally:
        loop.stop()
    return {"ttft_ms": 1e3 * (times[0] - t0), "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
            "e2e_tok_s": len(times) / (times[-1] - t0)}


def mesh(device: str, attn_workers: int, dtype: str, log_dir: str, dense_kv: int | None = None):
    from hetis.mesh.redisproc import RedisProcess, free_port
    from hetis.up import LOCAL_HOST, LocalCluster, service_commands
    redis = RedisProcess()
    ns = SimpleNamespace(attn_workers=attn_workers, port=free_port(), redis_url=redis.url, model=None,
                         dtype=dtype, policy="hetis", threads=4, dense_workers=1, tp=1,
                         dense_kv_tokens=dense_kv)
    cmds = service_commands(ns)
    for name, argv in cmds:
        if name.startswith("dense"):
            argv += ["--device", device]
    cluster = LocalCluster(cmds, log_dir)
    try:
        cluster.start()
        router = f"{LOCAL_HOST}:{ns.port}"
        cluster.wait_ready(router, attn_workers, timeout=300, progress=print)
    except BaseException:
        cluster.stop()
        redis.stop()
        raise
    return redis, cluster, router


def mesh_tokens(router: str, prompts, sampling: list[dict]) -> list[list[int]]:
    import threading

    from hetis import Client
    out = [None] * len(prompts)

    def one(i):
        with Client(router, timeout=600) as c:
            out[i] = [t for ch in c.stream(prompt_token_ids=prompts[i], **sampling[i]) for t in ch.token_ids]
    ths = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return out


def profile(dev: str, batch: int = 64, context: int = 256, steps: int = 5) -> dict:
    """Where a bf16 decode step of ``batch`` sequences goes: wall time per step, CUDA kernel
    launches per step, the top operators by CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from hetis import LLM, SamplingParams
    llm = LLM(device=dev, dtype="bfloat16", max_num_seqs=batch, max_num_batched_tokens=batch * context)
    eng = llm.engine
    for i, p in enumerate(workload(batch, seed=3)):
        eng.add_request(f"p{i}", p[:context], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    while any(s.num_computed < len(s.prompt_token_ids) for s in eng.seqs.values()):
        eng.step()
    for _ in range(3):  # warm
        eng.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync()
    wall = (time.perf_counter() - t0) / steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with prof(activities=acts) as pr:
        for _ in range(steps):
            eng.step()
        sync()
    ka = pr.key_averages()
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in ka if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                   "cudaMemcpyAsync"))
    top = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    table = ka.table(sort_by="self_cpu_time_total", row_limit=15)
    print(table, flush=True)
    return {"batch": batch, "context": context, "step_ms": 1e3 * wall,
            "kernel_launches_per_step": launches / steps, "memcpy_or_sync_per_step": syncs / steps,
            "top_self_cpu_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / steps for e in top}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke test)")
    ap.add_argument("--parts", default="exact,inproc,mesh",
                    help="comma-separated: exact, inproc, mesh (default all); parts run in separate "
                    "calls add up in --out")
    ap.add_argument("--out", default="bench/results/gpu.json")
    args = ap.parse_args(argv)
    from hetis import LLM, SamplingParams
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev, parts = args.device, set(args.parts.split(","))
    res: dict = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            res = json.load(f)
    res.update({"device": dev, "torch": torch.__version__, "python": platform.python_version(),
                "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else None,
                "cpu_threads": torch.get_num_threads()})
    print(json.dumps(res), flush=True)

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    n_tok = 8 if args.quick else 24
    n1, n2, out_len = (16, 32, 32) if args.quick else (64, 256, 128)
    cpu = LLM()
    prompts = [cpu.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(temperature=0, max_tokens=n_tok, ignore_eos=True)
    seeded = [SamplingParams(temperature=0.8, top_p=0.95, seed=7 + i, max_tokens=n_tok, ignore_eos=True)
              for i in range(len(prompts))]
    want_g = tokens(cpu, prompts, greedy)

    if "exact" in parts:
        want_s = tokens(cpu, prompts, seeded)
        t0 = time.perf_counter()
        g32 = LLM(device=dev)
        res["load_s_float32"] = time.perf_counter() - t0
        got_g, got_s = tokens(g32, prompts, greedy), tokens(g32, prompts, seeded)
        res["exact"] = {"greedy_identical": sum(a == b for a, b in zip(got_g, want_g)),
                        "seeded_identical": sum(a == b for a, b in zip(got_s, want_s)),
                        "of": len(prompts), "tokens_each": n_tok}
        print("exactness", res["exact"], flush=True)
        del g32
        save()
    del cpu

    if "inproc" in parts:
        bf = LLM(device=dev, dtype="bfloat16", max_num_seqs=64)
        res["bf16_64_requests"] = throughput(bf, workload(n1), out_len)
        print("bf16", res["bf16_64_requests"], flush=True)
        res["bf16_one_stream"] = one_stream(bf, workload(1, seed=1)[0][:256], out_len)
        print("one stream", res["bf16_one_stream"], flush=True)
        del bf
        big = LLM(device=dev, dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=8192)
        res["bf16_256_requests"] = throughput(big, workload(n2, seed=2), out_len)
        print("bf16 256", res["bf16_256_requests"], flush=True)
        del big
        save()

    if "profile" in parts:
        res["decode_profile"] = profile(dev)
        save()

    if "mesh" in parts:
        from bench.run_all import bench
        from hetis import Client
        for n_attn in (2, 0):
            key = f"mesh_{n_attn}_attn_cpu"
            for dtype in ("float32", "bfloat16"):
                log_dir = tempfile.mkdtemp(prefix=f"hetis-gpu-mesh{n_attn}-")
                print(f"\nmesh: dense worker on {dev}, {n_attn} attention workers on the CPU, "
                      f"{dtype} (logs {log_dir})", flush=True)
                redis, cluster, router = mesh(dev, n_attn, dtype, log_dir, 16384 if n_attn else None)
                try:
                    if dtype == "float32":
                        sampling = [dict(temperature=0, max_tokens=n_tok, ignore_eos=True)] * len(prompts)
                        got = mesh_tokens(router, prompts, sampling)
                        res.setdefault(key, {})["float32_greedy_identical"] = sum(
                            a == b for a, b in zip(got, want_g))
                    else:
                        r = bench(["--target", router, "--num-prompts", str(n1), "--input-len-min", "64",
                                   "--input-len-max", "512", "--random-output-len", str(out_len),
                                   "--ignore-eos", "--seed", "0", "--disable-tqdm"])
                        with Client(router) as c:
                            st = c.cluster_status()
                        res.setdefault(key, {})["bf16"] = {
                            "bench": {k: v for k, v in r.items() if k not in ("requests", "baseline")},
                            "output_tok_s": r["output_throughput"], "steps": st["steps"],
                            "devices": [{"id": w["id"], "device": w["device"], "steps": w["steps"]}
                                        for w in st["workers"]]}
                finally:
                    cluster.stop()
                    redis.stop()
                print(key, json.dumps(res.get(key))[:600], flush=True)
                save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
