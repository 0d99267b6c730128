"""The engine against its GEMM floor: ``engine_vs_gemm_floor`` of ``make bench``.

    .venv/bin/python -m bench.gemm_floor [--quick] [--dtype bfloat16] [--threads T] [--measured TOK_S]

The floor is the output tok/s the engine would reach on the make-bench workload if every
step took only its matrix multiplications: the projections and the MLP of every layer
for the step's tokens, and the LM head for its sampled rows, with the model's own
weights and compute dtype, timed alone (median of three after a warm-up). The steps are
the ones the engine runs: the make-bench requests all arrive at once, so the real
scheduler (driven here on a virtual clock by the simulator, hetis/sim/simulator.py)
makes the same steps whatever they cost. ``engine_vs_gemm_floor`` = the engine's
measured output tok/s over the floor's: 1.0 would be an engine with no attention, no
elementwise work and no overhead. Issue 13 asks for at least 0.7.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hetis.defaults import DTYPE_NAMES, KV_CACHE_DTYPES


def step_shapes(args, mc, max_model_len: int, kv_tokens: int) -> list[tuple[int, int]]:
    """(tokens, sampled rows) of every step the engine (``kv_tokens`` of KV) takes on the
    workload of ``args``."""
    import numpy as np

    from hetis.bench.workloads import build_workload
    from hetis.engine.sampling import SamplingParams
    from hetis.sim.measured import MeasuredDevice, record_steps, shape_of
    from hetis.sim.simulator import Clock, Deployment, build
    shape = shape_of(mc)
    dev = MeasuredDevice(1e-3, 0, 0, 0, 0, 0, kv_tokens=kv_tokens)
    engine, ex, _ = build(Deployment("cpu"), shape, Clock(), "local-only", args.max_num_seqs,
                          args.max_num_batched_tokens, max_model_len, measured={"cpu": dev})
    steps: list[tuple] = []
    record_steps(ex, shape, steps.append)
    for i, r in enumerate(build_workload(args, np.arange(mc.vocab_size), max_model_len)):
        engine.add_request(f"r{i}", [1] * r.prompt_len,
                           SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                engine.release(o.seq)
    return [(s[1], s[2]) for s in steps]


def _time(fn, reps: int = 3) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def floor_seconds(model, shapes: list[tuple[int, int]]) -> dict:
    """Seconds of GEMMs alone over ``shapes``, each row count timed once."""
    dt, hid = model.compute_dtype, model.cfg.hidden_size
    rows, lm = collections.Counter(t for t, _ in shapes), collections.Counter(s for _, s in shapes if s)

    def layers(n):
        x = torch.randn(n, hid, dtype=dt)
        for L in model.layers:
            F.linear(x, L["qkv"])
            F.linear(x, L["o"])
            gu = F.linear(x, L["gate_up"])
            F.linear(gu[:, : gu.shape[1] // 2], L["down"])

    def head(n):
        F.linear(torch.randn(n, hid, dtype=dt), model.lm_head)
    total_layers = total_head = 0.0
    with torch.inference_mode():
        for n, k in tqdm(sorted(rows.items()), desc="GEMMs by row count", unit="shape"):
            total_layers += k * _time(lambda: layers(n))
        for n, k in sorted(lm.items()):
            total_head += k * _time(lambda: head(n))
    return {"steps": len(shapes), "row_counts": len(rows), "layers_s": total_layers,
            "lm_head_s": total_head, "floor_s": total_layers + total_head}


def measure(quick: bool, dtype: str, threads: int | None, engine_tok_s: float) -> dict:
    """The floor of the make-bench workload and ``engine_vs_gemm_floor`` against
    ``engine_tok_s`` (the engine's measured output tok/s on it)."""
    from bench.sim_vs_real import bench_args
    from hetis import LLM
    args = bench_args(quick, dtype, threads)
    if threads:
        torch.set_num_threads(threads)
    llm = LLM(dtype=dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len)
    model = llm.engine.executor.model
    shapes = step_shapes(args, llm.model_config, llm.engine_config.max_model_len,
                         llm.engine_config.kv_tokens)
    out_tokens = sum(s for _, s in shapes)
    res = floor_seconds(model, shapes)
    res.update(dtype=dtype, threads=torch.get_num_threads(), output_tokens=out_tokens,
               floor_output_tok_s=out_tokens / res["floor_s"], engine_output_tok_s=engine_tok_s)
    res["engine_vs_gemm_floor"] = engine_tok_s / res["floor_output_tok_s"]
    print(f"GEMM floor ({dtype}, {res['threads']} threads): {res['floor_s']:.1f} s for "
          f"{res['steps']} steps ({res['layers_s']:.1f} s layers + {res['lm_head_s']:.1f} s LM head) "
          f"= {res['floor_output_tok_s']:.1f} tok/s; engine {engine_tok_s:.1f} tok/s: "
          f"engine_vs_gemm_floor {res['engine_vs_gemm_floor']:.2f}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                    help="the engine's KV cache (the floor does not depend on it)")
    ap.add_argument("--measured", type=float, default=None, metavar="TOK_S",
                    help="the engine's output tok/s (default: run hetis bench here)")
    a = ap.parse_args(argv)
    measured = a.measured
    if measured is None:
        from bench.run_all import bench
        from bench.sim_vs_real import bench_argv
        measured = bench(bench_argv(a.quick, a.dtype, a.threads)
                         + ["--kv-cache-dtype", a.kv_cache_dtype])["output_throughput"]
    measure(a.quick, a.dtype, a.threads, measured)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
