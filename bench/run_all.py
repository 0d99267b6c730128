"""`make bench`: the serving benchmarks on one fixed workload, results in bench/results/.

    .venv/bin/python -m bench.run_all [--quick] [--dtype D] [--kv-cache-dtype K] [--threads T]
        [--mesh-threads T]

Workload: 64 requests, prompts of 64-512 tokens (uniform), 128 output tokens each,
ignore_eos, all sent at t=0 (--quick: 16 requests, 32 output tokens).

1. engine_vs_hf: the in-process engine (hetis.LLM, --dtype: bfloat16 by default,
   --threads) against transformers generate (float32, static batches of 8, same threads) on the same
   requests: Hetis output tok/s / HF output tok/s.
2. mesh_vs_engine: a local mesh (private Redis, two attention workers, a dense
   worker, the router; same dtype, policy hetis, --mesh-threads torch threads per
   service) against the in-process engine (same dtype and threads per process):
   mesh output tok/s / engine output tok/s.
3. step_vs_matmul: ``bench.step_vs_matmul.main(out_dir)``.
4. gemm_profile: GEMM GFLOPS by dtype and the workload's FLOP budget for both
   engines (``bench.gemm_profile``): the profile that bounds engine_vs_hf here.
5. sim_vs_real (after engine_vs_hf): the simulator calibrated on this machine
   (``bench.sim_vs_real``) predicts the engine run's output tok/s, and, calibrated on the
   mesh's own steps (the router's ``--step-log``), the mesh run's; ``sim_vs_real_error``
   is the mean absolute relative error over the runs predicted (``sim_vs_real_runs``).
6. gemm_floor (after engine_vs_hf): ``engine_vs_gemm_floor``, the engine's output tok/s
   over the tok/s it would reach if every step took only its GEMMs (``bench.gemm_floor``).

Writes engine_vs_hf.{json,png}, mesh_vs_engine.{json,png} and summary.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from types import SimpleNamespace

from hetis.defaults import DTYPE_NAMES, KV_CACHE_DTYPES

OUT = pathlib.Path(__file__).resolve().parent / "results"


def workload_flags(quick: bool) -> list[str]:
    n, out_len = (16, 32) if quick else (64, 128)
    return ["--num-prompts", str(n), "--input-len-min", "64", "--input-len-max", "512",
            "--random-output-len", str(out_len), "--ignore-eos", "--seed", "0"]


def bench(argv: list[str]) -> dict:
    """One ``hetis bench`` run, parsed and run exactly as the CLI would."""
    from hetis.bench.runner import run
    from hetis.cli import build_parser
    args = build_parser().parse_args(["bench", *argv])
    print(f"\n$ hetis bench {' '.join(argv)}", flush=True)
    return run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))


def bench_fresh(argv: list[str]) -> dict:
    """One ``hetis bench`` run in a process of its own: a thread count set where this
    process already ran parallel regions at another does not hold for every library
    (the one-thread engine beside the one-thread mesh measured 460-515 tok/s here, 297-300
    in a process of its own, against the 2-thread engine's 427-567)."""
    import subprocess
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "run.json")
        print(f"\n$ hetis bench {' '.join(argv)}  (own process)", flush=True)
        subprocess.run([sys.executable, "-m", "hetis.cli", "bench", *argv, "--out", out], check=True)
        with open(out) as f:
            return json.load(f)


def start_mesh(threads: int, log_dir: str, dtype: str = "bfloat16", attn_workers: int = 2,
               dense_workers: int = 1, tp: int = 1, dense_kv_tokens: int | None = None,
               router_args: tuple[str, ...] = (), dense_args: tuple[str, ...] = (),
               kv_cache_dtype: str = "auto"):
    """(redis, cluster, router address): ``hetis up``'s machinery, policy hetis; extra
    flags for the router and the dense workers (e.g. ``--device cuda``)."""
    from hetis.mesh.redisproc import RedisProcess, free_port
    from hetis.up import LOCAL_HOST, LocalCluster, service_commands
    redis = RedisProcess()
    ns = SimpleNamespace(attn_workers=attn_workers, port=free_port(), redis_url=redis.url,
                         model=None, dtype=dtype, policy="hetis", threads=threads,
                         dense_workers=dense_workers, tp=tp, dense_kv_tokens=dense_kv_tokens,
                         kv_cache_dtype=kv_cache_dtype)
    cmds = service_commands(ns)
    for name, argv in cmds:
        argv += router_args if name == "router" else dense_args if name.startswith("dense") else ()
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


def engine_vs_hf(out_dir: pathlib.Path, quick: bool, threads: int, dtype: str, kv: str = "auto") -> dict:
    return bench(["--engine", "local", "--dtype", dtype, "--threads", str(threads), "--kv-cache-dtype", kv,
                  *workload_flags(quick), "--baseline", "hf", "--baseline-batch", "8",
                  "--out", str(out_dir / "engine_vs_hf.json"),
                  "--plot", str(out_dir / "engine_vs_hf.png")])


def mesh_vs_engine(out_dir: pathlib.Path, quick: bool, threads: int, dtype: str,
                   engine: dict | None, predict: bool = False, kv: str = "auto") -> dict:
    """The mesh, then (unless ``engine`` was measured with the same threads) the engine."""
    log_dir = tempfile.mkdtemp(prefix="hetis-bench-mesh-")
    print(f"\nstarting the mesh (2 attention workers, {dtype}, {threads} thread(s) per "
          f"service; logs in {log_dir})", flush=True)
    step_log = os.path.join(log_dir, "steps.jsonl")
    redis, cluster, router = start_mesh(threads, log_dir, dtype, router_args=("--step-log", step_log),
                                        kv_cache_dtype=kv)
    try:
        mesh = bench(["--target", router, "--threads", str(threads), *workload_flags(quick)])
        mesh["step_breakdown"] = step_breakdown(router)
        if predict:   # the simulator calibrated on this mesh predicts the run just measured
            try:
                from bench.sim_vs_real import bench_args, predict_mesh
                mesh["prediction"] = predict_mesh(router, step_log, bench_args(quick, dtype, threads))
            except Exception as e:  # noqa: BLE001 - the comparison still stands
                mesh["prediction"] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
    finally:
        cluster.stop()
        redis.stop()
    if engine is None or engine["threads"] != threads or engine["dtype"] != dtype:
        engine = bench_fresh(["--engine", "local", "--dtype", dtype, "--threads", str(threads),
                              "--kv-cache-dtype", kv, *workload_flags(quick), "--disable-tqdm"])
    engine = {k: v for k, v in engine.items() if k not in ("baseline", "speedup_vs_baseline")}
    res = {"mesh": mesh, "engine": engine, "threads_per_process": threads,
           "mesh_vs_engine": mesh["output_throughput"] / max(engine["output_throughput"], 1e-12)}
    from hetis.bench.report import plot_compare, write_json
    write_json(res, str(out_dir / "mesh_vs_engine.json"))
    plot_compare({"mesh (2 attention workers)": mesh, "in-process engine": engine},
                 str(out_dir / "mesh_vs_engine.png"),
                 title=f"mesh vs in-process engine: {dtype}, {mesh['num_prompts']} requests, "
                       f"{threads} torch thread(s) per process")
    return res


def step_breakdown(router: str) -> dict:
    """Where the mesh's steps spent their time (ClusterStatus.steps), as seconds and shares."""
    from hetis import Client
    with Client(router) as c:
        st = c.cluster_status()["steps"]
    total = st["step_call_s"] or 1e-12
    parts = {
        "grpc_step_call_overhead_s": st["step_call_s"] - st["dense_worker_s"],
        "dense_compute_s": st["dense_compute_s"],
        "local_attention_s": st["local_attn_s"],
        "tensor_exchange_wait_s": st["exchange_wait_s"],
    }
    out = {"steps": st["steps"], "step_call_s": st["step_call_s"], **parts}
    out["shares"] = {k.removesuffix("_s"): v / total for k, v in parts.items()}
    print("mesh step time: " + ", ".join(f"{k} {v:.0%}" for k, v in out["shares"].items()), flush=True)
    return out


def step_vs_matmul(out_dir: pathlib.Path, threads: int, kv: str = "auto") -> dict:
    try:
        mod = importlib.import_module("bench.step_vs_matmul")
    except ModuleNotFoundError as e:
        if e.name not in ("bench.step_vs_matmul", "bench"):
            raise
        raise RuntimeError("bench/step_vs_matmul.py is not there yet; skipped") from None
    if not hasattr(mod, "main"):
        raise RuntimeError("bench/step_vs_matmul.py has no main(out_dir); skipped")
    return mod.main(out_dir, threads=threads, kv_cache_dtype=kv)   # threads explicit: mesh_vs_engine leaves torch at --mesh-threads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 requests of 32 output tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the engine and the HF baseline (default: all cores)")
    ap.add_argument("--mesh-threads", type=int, default=1,
                    help="torch threads per process in mesh_vs_engine (each mesh service and "
                    "the engine it is compared with; default %(default)s)")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16",
                    help="the engine's and the mesh's dtype (default %(default)s; the HF "
                    "baseline is float32 either way)")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                    help="the engine's and the mesh workers' KV cache (default %(default)s)")
    ap.add_argument("--out-dir", default=str(OUT), help="default %(default)s")
    ap.add_argument("--only", nargs="+", choices=["engine_vs_hf", "sim_vs_real", "gemm_floor",
                                                  "mesh_vs_engine", "step_vs_matmul", "gemm_profile"],
                    default=None,
                    help="run only these parts")
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["engine_vs_hf", "sim_vs_real", "gemm_floor", "mesh_vs_engine",
                          "step_vs_matmul", "gemm_profile"]
    if {"sim_vs_real", "gemm_floor"} & set(parts) and "engine_vs_hf" not in parts:
        # both are measured against the engine run of engine_vs_hf
        print("sim_vs_real and gemm_floor compare with the engine's run: running engine_vs_hf too", flush=True)
        parts = ["engine_vs_hf", *parts]
    n, out_len = (16, 32) if args.quick else (64, 128)
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "quick": args.quick, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
               "threads": args.threads, "mesh_threads": args.mesh_threads,
               "workload": {"num_prompts": n, "input_len": [64, 512], "output_len": out_len,
                            "ignore_eos": True, "request_rate": "inf", "seed": 0},
               "engine_vs_hf": None, "mesh_vs_engine": None, "step_vs_matmul": None,
               "sim_vs_real_error": None, "engine_vs_gemm_floor": None,
               "throughputs": {}, "errors": {}}
    th = summary["throughputs"]
    failed = False
    engine = None
    t0 = time.perf_counter()
    if "engine_vs_hf" in parts:
        try:
            r = engine_vs_hf(out_dir, args.quick, args.threads, args.dtype, args.kv_cache_dtype)
            engine = r
            summary["engine_vs_hf"] = r["speedup_vs_baseline"]
            th["engine_output_tok_s"] = r["output_throughput"]
            th["hf_f32_batch8_output_tok_s"] = r["baseline"]["output_throughput"]
        except Exception as e:  # noqa: BLE001 - the other parts still run
            failed = True
            summary["errors"]["engine_vs_hf"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if "sim_vs_real" in parts and engine is not None:
        # the simulator, calibrated here, predicting the engine run just measured
        try:
            from bench.sim_vs_real import bench_args, predict
            pred = predict(bench_args(args.quick, args.dtype, args.threads))
            real = engine["output_throughput"]
            err = abs(pred["predicted_output_tok_s"] - real) / real
            summary["sim_vs_real_error"] = err   # averaged with the mesh's below
            summary["sim_vs_real_runs"] = {"engine": {"measured_output_tok_s": real, **pred,
                                                      "relative_error": err}}
            print(f"sim_vs_real: predicted {pred['predicted_output_tok_s']:.1f} tok/s, measured "
                  f"{real:.1f}: error {err:.1%}", flush=True)
        except Exception as e:  # noqa: BLE001
            failed = True
            summary["errors"]["sim_vs_real"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if "gemm_floor" in parts and engine is not None:
        # the engine run just measured against the same steps' GEMMs alone
        try:
            from bench.gemm_floor import measure
            r = measure(args.quick, args.dtype, args.threads, engine["output_throughput"])
            summary["engine_vs_gemm_floor"] = r["engine_vs_gemm_floor"]
            summary["gemm_floor_detail"] = r
        except Exception as e:  # noqa: BLE001
            failed = True
            summary["errors"]["gemm_floor"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if "mesh_vs_engine" in parts:
        try:
            r = mesh_vs_engine(out_dir, args.quick, args.mesh_threads, args.dtype, engine,
                               predict="sim_vs_real" in parts, kv=args.kv_cache_dtype)
            summary["mesh_vs_engine"] = r["mesh_vs_engine"]
            pred = r["mesh"].get("prediction") or {}
            if "predicted_output_tok_s" in pred:
                real = r["mesh"]["output_throughput"]
                err = abs(pred["predicted_output_tok_s"] - real) / real
                errs = summary.setdefault("sim_vs_real_runs", {})
                errs["mesh"] = {"measured_output_tok_s": real, **pred, "relative_error": err}
                summary["sim_vs_real_error"] = sum(e["relative_error"] for e in errs.values()) / len(errs)
                print(f"sim_vs_real (mesh): predicted {pred['predicted_output_tok_s']:.1f} tok/s, "
                      f"measured {real:.1f}: error {err:.1%}", flush=True)
            th["mesh_output_tok_s"] = r["mesh"]["output_throughput"]
            th["engine_output_tok_s_at_mesh_threads"] = r["engine"]["output_throughput"]
            summary["mesh_step_breakdown"] = r["mesh"].get("step_breakdown")
        except Exception as e:  # noqa: BLE001
            failed = True
            summary["errors"]["mesh_vs_engine"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if "step_vs_matmul" in parts:
        try:
            r = step_vs_matmul(out_dir, args.threads, args.kv_cache_dtype)
            summary["step_vs_matmul"] = r["step_vs_matmul"]
            summary["step_vs_matmul_detail"] = {k: v for k, v in r.items() if k != "profile_last_step"}
        except RuntimeError as e:
            summary["errors"]["step_vs_matmul"] = str(e)
            print(f"step_vs_matmul: {e}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            failed = True
            summary["errors"]["step_vs_matmul"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if "gemm_profile" in parts:  # why engine_vs_hf is bounded here: GEMM speed by dtype, FLOP budget
        from bench.gemm_profile import main as gemm_profile
        summary["gemm_profile"] = gemm_profile(str(out_dir), args.threads)
    summary["wall_s"] = time.perf_counter() - t0
    if args.only and (out_dir / "summary.json").exists():
        # a partial re-run updates only its parts of the last full summary
        old = json.loads((out_dir / "summary.json").read_text())
        if old.get("quick") == args.quick:
            kept = {"engine_vs_hf": ("engine_vs_hf",),   # each part's keys in the summary
                    "mesh_vs_engine": ("mesh_vs_engine", "mesh_step_breakdown"),
                    "step_vs_matmul": ("step_vs_matmul", "step_vs_matmul_detail"),
                    "gemm_floor": ("engine_vs_gemm_floor", "gemm_floor_detail"),
                    "sim_vs_real": ("sim_vs_real_error", "sim_vs_real_runs")}
            for part, keys in kept.items():
                if part not in parts:
                    summary.update({k: old[k] for k in keys if k in old})
            summary["throughputs"] = {**old.get("throughputs", {}), **summary["throughputs"]}
            summary["errors"] = {**{k: v for k, v in old.get("errors", {}).items() if k not in parts},
                                 **summary["errors"]}
            summary["reruns"] = old.get("reruns", []) + [{"parts": parts, "date": summary["date"]}]
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nsummary ({out_dir / 'summary.json'}):")
    print(json.dumps({k: summary[k] for k in ("engine_vs_hf", "mesh_vs_engine", "step_vs_matmul",
                                              "sim_vs_real_error", "throughputs", "errors")},
                     indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
