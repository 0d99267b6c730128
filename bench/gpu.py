"""Hetis on a GPU: exactness, in-process throughput, and the heterogeneous mesh.

    python -m bench.gpu [--device cuda] [--quick] [--parts exact,inproc,mesh,profile]
                        [--out bench/results/gpu.json]

Run on a machine with a CUDA GPU (the project's CI has none: this is how the
GPU figures in the README were taken; on a CPU ``--device cpu`` runs the same
code paths as a smoke test).

1. Exactness: ``hetis.LLM(device=DEV)`` in float32 (TF32 off) against the same
   engine on the CPU: greedy tokens of six prompts, and seeded sampling.
2. In-process throughput in bfloat16: the ``make bench`` workload (64 requests,
   prompts of 64-512 random tokens, 128 output tokens, all at once) and 256
   requests with ``max_num_seqs=256``; one stream (256-token prompt, 128 tokens); and
   the 64 requests again through ``hetis bench --engine local`` (the engine behind
   ``ServingLoop``, as ``make bench`` drives it: TTFT/TPOT/ITL percentiles, the same
   client-side metrics as the mesh's runs in 3).
3. The heterogeneous mesh: ``hetis up``'s services with the dense worker on
   DEV holding KV for about 16 requests (``--kv-tokens 16384``) and two attention
   workers on the CPU (gloo channels: q/k/v cross from the GPU to the host and
   back every layer), policy ``hetis``: float32 tokens against (1), then the
   bfloat16 workload of (2); and the same with 0 attention workers and the dense
   worker's default KV (all of it on DEV).
4. Profile: one bf16 decode step of 64 sequences (context 256) under torch.profiler,
   with the process's torch threads as they are and with one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch


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


def bench_local(dev: str, n: int, out_len: int, threads: int) -> dict:
    """``hetis bench --engine local`` (bench/run_all.py's workload) with the engine on ``dev``:
    ``LocalTarget`` builds ``hetis.LLM`` with the runner's flags, which name no device, so
    ``hetis.LLM`` is wrapped for the run."""
    import functools

    import hetis
    from bench.run_all import bench
    llm_cls = hetis.LLM
    hetis.LLM = functools.partial(llm_cls, device=dev)
    try:
        r = bench(["--engine", "local", "--dtype", "bfloat16", "--threads", str(threads),
                   "--num-prompts", str(n), "--input-len-min", "64", "--input-len-max", "512",
                   "--random-output-len", str(out_len), "--ignore-eos", "--seed", "0",
                   "--disable-tqdm"])
    finally:
        hetis.LLM = llm_cls
    return summary(r)


LATENCY_KEYS = ("output_throughput", "duration_s", "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
                "mean_itl_ms", "p50_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms")


def summary(r: dict) -> dict:
    """A ``hetis bench`` result without its per-request rows."""
    out = {k: r[k] for k in LATENCY_KEYS if k in r}
    out.update({k: r[k] for k in ("completed", "failed", "total_input_tokens",
                                   "total_output_tokens", "threads", "workers") if k in r})
    return out


def mesh(device: str, attn_workers: int, dtype: str, log_dir: str, threads: int,
         dense_kv: int | None = None):
    from bench.run_all import start_mesh
    return start_mesh(threads, log_dir, dtype, attn_workers, dense_kv_tokens=dense_kv,
                      dense_args=("--device", device))


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
    walls = {}
    threads = torch.get_num_threads()
    for t in (threads, 1):  # the step's CPU work is small index tensors: do threads help or hurt?
        torch.set_num_threads(t)
        eng.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync()
        walls[t] = (time.perf_counter() - t0) / steps
    torch.set_num_threads(threads)
    wall = walls[threads]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with prof(activities=acts) as pr:
        for _ in range(steps):
            eng.step()
        sync()
    ka = pr.key_averages()
    from torch.autograd import DeviceType
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                     "cuLaunchKernel", "cuLaunchKernelEx"))
    syncs = sum(e.count for e in ka if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                   "cudaMemcpyAsync"))
    top = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    table = ka.table(sort_by="self_cpu_time_total", row_limit=15)
    print(table, flush=True)
    return {"batch": batch, "context": context, "step_ms": 1e3 * wall,
            "step_ms_by_torch_threads": {str(t): 1e3 * w for t, w in walls.items()},
            # kernels' own time (the operators' rows repeat it: count device rows only)
            "gpu_busy_ms_per_step": sum(e.self_device_time_total for e in ka
                                        if e.device_type == DeviceType.CUDA) / 1e3 / steps,
            "kernel_launches_per_step": launches / steps, "memcpy_or_sync_per_step": syncs / steps,
            "top_self_cpu_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / steps for e in top}}


def test_prompts(tok) -> list[list[int]]:
    """The six prompts of the equivalence tests (tests/conftest.py's ``prompts``): short,
    code, a 150+ token one, and two chats."""
    long_text = " ".join(
        f"Paragraph {i}: the river carried the boats past the old mill, where the miller "
        f"counted sacks of grain and wrote the number {i * 7} in his ledger." for i in range(8))
    texts = ["The capital of France is", "def fibonacci(n):",
             long_text + " Summarise the story:", "Once upon a time, in a land far away,"]
    ids = [tok.encode(t) for t in texts]
    ids.append(tok.encode_chat([{"role": "user", "content": "What is the tallest mountain?"}]))
    ids.append(tok.encode_chat([{"role": "system", "content": "You answer in French."},
                                {"role": "user", "content": "How are you today?"}]))
    return ids


def last_logits(llm, ids: list[int]) -> torch.Tensor:
    """float32 logits of the prompt's last position (as tests/model/test_equivalence.py)."""
    from hetis import SamplingParams
    from hetis.engine.step import Step, StepChunk
    eng = llm.engine
    eng.add_request("logits-probe", ids, SamplingParams(temperature=0, max_tokens=1))
    chunks = eng.scheduler.schedule()
    step = Step([StepChunk(c.seq.seq_id, c.start, c.seq.tokens(c.start, c.start + c.num_new),
                           c.sample) for c in chunks], eng.scheduler.items(chunks))
    out = eng.executor.forward(step)[0].float().cpu()
    eng.abort("logits-probe")
    return out


def hf_reference(prompts, n: int) -> list[list[int]] | None:
    """transformers' greedy tokens (float32, CPU) from the same GGUF, as the tests' reference."""
    try:
        import transformers

        from hetis.model.loader import default_model_path
        from tests.helpers.reference import hf_greedy
        path = default_model_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        return [hf_greedy(model, ids, n) for ids in prompts]
    except Exception as e:  # noqa: BLE001 (the reference is a bonus: the engine's own CPU run is the baseline)
        print(f"transformers reference unavailable: {type(e).__name__}: {e}", flush=True)
        return None


def environment(dev: str) -> dict:
    env = {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if dev.startswith("cuda"):
        p = torch.cuda.get_device_properties(dev)
        env.update({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                    "sm_count": p.multi_processor_count, "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(),
                    "nccl": ".".join(map(str, torch.cuda.nccl.version()))})
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke test)")
    ap.add_argument("--parts", default="exact,inproc,mesh,profile",
                    help="comma-separated: exact, inproc, mesh, profile (default all); parts run "
                    "in separate calls add up in --out")
    ap.add_argument("--mesh-threads", type=int, default=4, help="torch threads per mesh service")
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--plot", metavar="PNG", help="draw the bf16 comparison of --out's figures "
                    "(with --parts '' only that, from an existing --out)")
    args = ap.parse_args(argv)
    from hetis import LLM, SamplingParams
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev, parts = args.device, {p for p in args.parts.split(",") if p}
    res: dict = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            res = json.load(f)
    if not parts:
        if args.plot:
            plot(res, args.plot)
        return 0
    res.update(environment(dev))
    print(json.dumps(res), flush=True)

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    n_tok = 8 if args.quick else 32
    n1, n2, out_len = (16, 32, 32) if args.quick else (64, 256, 128)
    cpu = LLM() if parts & {"exact", "mesh"} else None  # the reference: the engine on the CPU
    if cpu is not None:
        prompts = test_prompts(cpu.tokenizer)
        greedy = SamplingParams(temperature=0, max_tokens=n_tok, ignore_eos=True)
        seeded = [SamplingParams(temperature=0.8, top_p=0.95, seed=7 + i, max_tokens=n_tok,
                                 ignore_eos=True) for i in range(len(prompts))]
        want_g = tokens(cpu, prompts, greedy)

    if "exact" in parts:
        want_s = tokens(cpu, prompts, seeded)
        ref_logits = last_logits(cpu, prompts[2])
        hf = None if args.quick else hf_reference(prompts, n_tok)
        t0 = time.perf_counter()
        g32 = LLM(device=dev)
        res["load_s_float32"] = time.perf_counter() - t0
        got_g, got_s = tokens(g32, prompts, greedy), tokens(g32, prompts, seeded)
        lg = last_logits(g32, prompts[2])
        res["exact"] = {"prompts": "tests/conftest.py's six (short, code, 150+ tokens, two chats)",
                        "greedy_identical": sum(a == b for a, b in zip(got_g, want_g)),
                        "seeded_identical": sum(a == b for a, b in zip(got_s, want_s)),
                        "of": len(prompts), "tokens_each": n_tok, "tf32": False,
                        "logits_max_abs_diff_vs_cpu": float((lg - ref_logits).abs().max()),
                        "cpu_greedy_identical_to_transformers":
                            None if hf is None else sum(a == b for a, b in zip(want_g, hf)),
                        "device_greedy_identical_to_transformers":
                            None if hf is None else sum(a == b for a, b in zip(got_g, hf))}
        print("exactness", res["exact"], flush=True)
        del g32
        save()
    del cpu

    if "inproc" in parts:
        bf = LLM(device=dev, dtype="bfloat16", max_num_seqs=64)
        res["bf16_64_requests"] = {**throughput(bf, workload(n1), out_len), "max_num_seqs": 64,
                                   "max_num_batched_tokens": 1024}
        print("bf16", res["bf16_64_requests"], flush=True)
        res["bf16_one_stream"] = {**one_stream(bf, workload(1, seed=1)[0][:256], out_len),
                                  "prompt_tokens": 256, "output_tokens": out_len}
        print("one stream", res["bf16_one_stream"], flush=True)
        del bf
        big = LLM(device=dev, dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=8192)
        res["bf16_256_requests"] = {**throughput(big, workload(n2, seed=2), out_len),
                                    "max_num_seqs": 256, "max_num_batched_tokens": 8192}
        print("bf16 256", res["bf16_256_requests"], flush=True)
        del big
        save()
        # the make-bench workload through hetis bench's local target: client-side latencies
        res["bf16_64_requests_bench_local"] = bench_local(dev, n1, out_len, torch.get_num_threads())
        print("bench local", json.dumps(res["bf16_64_requests_bench_local"]), flush=True)
        save()

    if "mesh" in parts:
        from bench.run_all import bench
        from hetis import Client
        for n_attn in (2, 0):
            key = f"mesh_{n_attn}_attn_cpu"
            res[key] = {"attn_workers": n_attn, "threads_per_service": args.mesh_threads,
                        "dense_kv_tokens": 16384 if n_attn else "default", "policy": "hetis"}
            for dtype in ("float32", "bfloat16"):
                log_dir = tempfile.mkdtemp(prefix=f"hetis-gpu-mesh{n_attn}-")
                print(f"\nmesh: dense worker on {dev}, {n_attn} attention workers on the CPU, "
                      f"{dtype} (logs {log_dir})", flush=True)
                t0 = time.perf_counter()
                redis, cluster, router = mesh(dev, n_attn, dtype, log_dir, args.mesh_threads,
                                              16384 if n_attn else None)
                res[key][f"start_s_{dtype}"] = time.perf_counter() - t0
                try:
                    if dtype == "float32":
                        sampling = [{"temperature": 0, "max_tokens": n_tok, "ignore_eos": True}] * len(prompts)
                        got = mesh_tokens(router, prompts, sampling)
                        res[key]["float32_greedy_identical"] = sum(a == b for a, b in zip(got, want_g))
                        res[key]["float32_of"] = len(prompts)
                    else:
                        r = bench(["--target", router, "--num-prompts", str(n1), "--input-len-min", "64",
                                   "--input-len-max", "512", "--random-output-len", str(out_len),
                                   "--ignore-eos", "--seed", "0", "--disable-tqdm"])
                        with Client(router) as c:
                            st = c.cluster_status()
                        res[key]["bf16"] = {**summary(r), "steps": st["steps"],
                                            "devices": [{"id": w["id"], "device": w["device"],
                                                         "steps": w["steps"]} for w in st["workers"]]}
                finally:
                    cluster.stop()
                    redis.stop()
                print(key, json.dumps(res.get(key))[:800], flush=True)
                save()

    if "profile" in parts:
        res["decode_profile"] = profile(dev, *((8, 64, 2) if args.quick else ()))
        print("profile", json.dumps(res["decode_profile"])[:600], flush=True)
        save()

    comparison(res)
    save()
    if args.plot:
        plot(res, args.plot)
    return 0


def plot(res: dict, path: str) -> None:
    """Output tok/s, TTFT and TPOT (mean and p99) of the bf16 make-bench workload: in-process,
    the mesh with two CPU attention workers, the mesh with all KV on the dense worker."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {"in-process": res.get("bf16_64_requests_bench_local"),
            "mesh: GPU dense +\n2 CPU attention": res.get("mesh_2_attn_cpu", {}).get("bf16"),
            "mesh: GPU dense,\nno attention workers": res.get("mesh_0_attn_cpu", {}).get("bf16")}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = list(runs)
    axes[0].bar(names, [r["output_throughput"] for r in runs.values()], color="tab:blue")
    axes[0].set_ylabel("output tok/s")
    for ax, metric in ((axes[1], "ttft"), (axes[2], "tpot")):
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [r[f"mean_{metric}_ms"] for r in runs.values()], 0.4, label="mean")
        ax.bar([i + 0.2 for i in x], [r[f"p99_{metric}_ms"] for r in runs.values()], 0.4, label="p99")
        ax.set_xticks(list(x), names)
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"bf16, 64 requests (prompts 64-512, 128 output tokens, all at t=0); "
                 f"{res.get('gpu')}, torch {res.get('torch')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def comparison(res: dict) -> None:
    """bf16 output tok/s of the make-bench workload, each run against the in-process one."""
    local = res.get("bf16_64_requests_bench_local", {}).get("output_throughput")
    rows = {"in-process (hetis bench --engine local)": local}
    for n in (2, 0):
        rows[f"mesh, {n} CPU attention workers"] = res.get(f"mesh_{n}_attn_cpu", {}).get(
            "bf16", {}).get("output_throughput")
    res["bf16_64_requests_compared"] = {
        k: {"output_tok_s": v, "vs_in_process": v / local if v and local else None}
        for k, v in rows.items()}
    for k, v in res["bf16_64_requests_compared"].items():
        print(f"{k:45s} {v['output_tok_s'] or float('nan'):8.1f} tok/s", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
