"""The simulator against this machine: predicted vs measured output throughput.

    .venv/bin/python -m bench.sim_vs_real [--quick] [--dtype bfloat16] [--threads T]
                                          [--measured TOK_S] [--out FILE.json]

Calibrates a device model of this CPU from real steps of two small workloads run
through ``hetis bench``'s own local target (:func:`hetis.sim.measured.calibrate`,
about 40 s), simulates the make-bench workload
(the same request lengths ``hetis bench`` draws for it: ``bench.run_all.workload_flags``)
through the real scheduler on a virtual clock, and compares the predicted output tok/s
with ``hetis bench --engine local`` on the same requests (run here, or given with
``--measured``: ``make bench`` passes the throughput it just measured). Prints and
writes the relative error; ``make bench`` records it as ``sim_vs_real_error``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

OUT = pathlib.Path(__file__).resolve().parent / "results"


def bench_argv(quick: bool, dtype: str, threads: int | None) -> list[str]:
    """``hetis bench`` flags of the in-process run on the make-bench workload."""
    from bench.run_all import workload_flags
    argv = ["--engine", "local", "--dtype", dtype, *workload_flags(quick), "--disable-tqdm"]
    return argv + (["--threads", str(threads)] if threads else [])


def bench_args(quick: bool, dtype: str, threads: int | None):
    from hetis.cli import build_parser
    return build_parser().parse_args(["bench", *bench_argv(quick, dtype, threads)])


def predict(args, log=print) -> dict:
    """Calibrate here, then simulate the workload of ``args`` (parsed ``hetis bench`` flags)."""
    import torch

    from hetis.bench.runner import make_target
    from hetis.sim.measured import calibrate
    if args.threads:
        torch.set_num_threads(args.threads)
    target = make_target(args)  # hetis bench's own local target: the same harness it measures
    llm = target.llm
    t0 = time.perf_counter()
    try:
        dev = calibrate(target, progress=lambda m: log(f"  calibrate: {m}"))
    finally:
        target.close()
    calib_s = time.perf_counter() - t0
    ec = llm.engine_config
    s = simulate_workload(args, dev, llm.model_config, args.max_num_seqs,
                          args.max_num_batched_tokens, ec.max_model_len)
    return {"predicted_output_tok_s": s["output_tok_s"], "predicted_duration_s": s["duration_s"],
            "predicted_steps": s["steps"], "calibration_s": calib_s,
            "device": {k: getattr(dev, k) for k in ("d0", "d1", "p1", "a_tok", "a_grp", "p_attn",
                                                     "e0", "e1")}}


def simulate_workload(args, dev, mc, max_num_seqs: int, max_num_batched_tokens: int,
                      max_model_len: int) -> dict:
    """The make-bench workload of ``args`` through the real scheduler on ``dev``."""
    import numpy as np

    from hetis.bench.workloads import build_workload
    from hetis.sim.measured import shape_of
    from hetis.sim.simulator import Deployment, simulate
    from hetis.sim.workloads import Request
    ids = np.arange(mc.vocab_size)  # lengths are all the simulator needs
    work = build_workload(args, ids, max_model_len)
    reqs = [Request(f"r{i}", 0.0, r.prompt_len, r.output_len) for i, r in enumerate(work)]
    shape = shape_of(mc, bytes_per_param=2 if args.dtype == "bfloat16" else 4)
    return simulate(Deployment("cpu"), shape, reqs, policy="local-only", max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                    measured={"cpu": dev}).summary()


def predict_mesh(router: str, step_log: str, args, log=print) -> dict:
    """Calibrate the running mesh at ``router`` (started with ``--step-log step_log``) as
    one device: the same calibration workloads through ``hetis bench``'s cluster target,
    its steps as the router timed them (dense worker, attention workers and the tensor
    exchange inside each), the wall time beyond them per step and sequence; then
    simulate the make-bench workload (``args``) with the router's engine settings."""
    from hetis import Client
    from hetis.bench.targets import ClusterTarget
    from hetis.model.loader import load_meta
    from hetis.sim.measured import calibration_runs, fit

    def steps():
        with open(step_log) as f:
            return [tuple(json.loads(line)) for line in f if line.strip()]
    t0 = time.perf_counter()
    target = ClusterTarget(router, None, timeout=600, ignore_eos=True)
    try:
        runs = calibration_runs(target, steps, progress=lambda m: log(f"  calibrate mesh: {m}"))
    finally:
        target.close()
    with Client(router) as c:
        st = c.cluster_status(timeout=30)
    kv = sum(int(w.get("kv_total_tokens", 0)) for w in st["workers"])
    dev = fit([r for run, _ in runs for r in run], runs, kv, lambda m: log(f"  calibrate mesh: {m}"),
              name="mesh")
    calib_s = time.perf_counter() - t0
    from hetis.mesh.flags import RouterConfig
    rc = RouterConfig()   # make bench's router runs with the defaults
    s = simulate_workload(args, dev, load_meta(None)[0], rc.max_num_seqs, rc.max_num_batched_tokens,
                          rc.max_model_len)
    return {"predicted_output_tok_s": s["output_tok_s"], "predicted_duration_s": s["duration_s"],
            "predicted_steps": s["steps"], "calibration_s": calib_s,
            "device": {k: getattr(dev, k) for k in ("d0", "d1", "p1", "a_tok", "a_grp", "p_attn",
                                                     "e0", "e1", "kv_tokens")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_vs_real", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 requests x 32 tokens")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--measured", type=float, default=None, metavar="TOK_S",
                    help="the measured output tok/s (default: run hetis bench here)")
    ap.add_argument("--out", default=str(OUT / "sim_vs_real.json"))
    a = ap.parse_args(argv)
    args = bench_args(a.quick, a.dtype, a.threads)
    pred = predict(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    measured = a.measured
    if measured is None:
        from bench.run_all import bench
        measured = bench(bench_argv(a.quick, a.dtype, a.threads))["output_throughput"]
    err = abs(pred["predicted_output_tok_s"] - measured) / measured
    out = {"workload": "make bench" + (" --quick" if a.quick else ""), "cpu": cpu_description(),
           "dtype": a.dtype,
           "threads": a.threads, "measured_output_tok_s": measured, **pred,
           "relative_error": err}
    print(json.dumps(out, indent=1))
    pathlib.Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


def cpu_description() -> str:
    """The CPU model and torch's capability (AVX2, AVX512...): figures depend on both."""
    import torch
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}; torch cpu capability {torch.backends.cpu.get_cpu_capability()}"


if __name__ == "__main__":
    sys.exit(main())
