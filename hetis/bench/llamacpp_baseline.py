"""The llama.cpp baseline: the same requests through llama.cpp, in the same run.

``hetis bench --baseline llama.cpp`` first benchmarks Hetis (as without a baseline),
then sends the very same requests (the same prompt token ids, output lengths and
arrival times) through llama.cpp on the same GGUF file with the same threads, greedy,
EOS ignored on both sides. llama-cpp-python lives in its own venv
(``.venv-llamacpp/``, made by ``make bench-llamacpp``); this module never imports it: it
runs ``hetis/bench/llamacpp_driver.py`` with that venv's python, a JSON spec in, JSON
timings out. The driver does what llama.cpp's server does with one slot per sequence:
one context, one KV stream per sequence, each iteration one ``llama_decode`` of every
generating sequence's next token plus prompt chunks (docs/bench-llamacpp.md).

Both sides' numbers go through the same ``compute_metrics``: output tok/s from the
first submit to the last token of all requests, and TPOT (decode alone: from a
request's first token to its last, per token after the first).

``python -m hetis.bench.llamacpp_baseline --out FILE`` (what ``make bench-llamacpp``
runs) does the issue's two workloads, each for Hetis in bfloat16 with dense weights and with
``--weights gguf``
against llama.cpp back to back, and writes the ratios.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from hetis.bench.metrics import RequestResult, compute_metrics

ENV_PYTHON = "HETIS_LLAMACPP_PYTHON"
DRIVER = pathlib.Path(__file__).with_name("llamacpp_driver.py")
_REPO = pathlib.Path(__file__).resolve().parents[2]


class LlamaCppMissing(RuntimeError):
    """No usable llama.cpp venv: ``hetis bench --baseline llama.cpp`` exits 2."""


class LlamaCppFailed(RuntimeError):
    """The driver failed (its log's tail in the message): ``hetis bench`` exits 1."""


def venv_python() -> pathlib.Path:
    """The llama.cpp venv's python: ``$HETIS_LLAMACPP_PYTHON``, else the checkout's
    ``.venv-llamacpp/bin/python``, else ``./.venv-llamacpp/bin/python``."""
    if os.environ.get(ENV_PYTHON):
        return pathlib.Path(os.environ[ENV_PYTHON])
    for root in (_REPO, pathlib.Path.cwd()):
        p = root / ".venv-llamacpp" / "bin" / "python"
        if p.exists():
            return p
    return _REPO / ".venv-llamacpp" / "bin" / "python"


def check_venv() -> tuple[pathlib.Path, str]:
    """(python, llama-cpp-python version), or LlamaCppMissing saying how to make it."""
    py = venv_python()
    how = ("run `make bench-llamacpp` first (it compiles llama-cpp-python from PyPI into "
           ".venv-llamacpp/, about 12 minutes on 2 cores)")
    if not (py.is_file() and os.access(py, os.X_OK)):
        raise LlamaCppMissing(f"--baseline llama.cpp: no llama.cpp environment ({py} is "
                              f"missing); {how}")
    try:
        p = subprocess.run([str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LlamaCppMissing(f"--baseline llama.cpp: {py} did not run ({e}); {how}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise LlamaCppMissing(f"--baseline llama.cpp: {py} cannot import llama_cpp ({last}); "
                              f"{how}")
    return py, p.stdout.strip()


def gguf_path(model: str | None) -> str:
    from hetis.model.loader import resolve_model
    path = resolve_model(model)
    if not str(path).endswith(".gguf"):
        raise ValueError(f"--baseline llama.cpp needs a .gguf model (got {path})")
    return str(path)


def run_llamacpp_baseline(requests, model: str | None, threads: int, n_slots: int,
                          offsets=None, warmup: bool = True, log=print, n_batch: int = 2048,
                          n_ubatch: int = 512, use_extra_bufts: bool = False) -> dict:
    """Run ``requests`` (``BenchRequest``s, sent at ``offsets`` s) through llama.cpp with
    ``n_slots`` sequences at most at once; metrics like Hetis's, and the driver's settings.

    ``use_extra_bufts`` False is llama.cpp's ``--no-repack``: no AMX buffer type, whose
    matmul segfaults on this project's AMX Xeon for Q4_1 batches of two or more tokens
    (llama-cpp-python 0.3.36; llama.cpp has open reports of it); its AVX-512 kernels run."""
    py, version = check_venv()
    path = gguf_path(model)
    offsets = np.zeros(len(requests)) if offsets is None else offsets
    spec = {"model": path, "threads": threads, "n_slots": n_slots, "n_batch": n_batch,
            "n_ubatch": n_ubatch, "kv_unified": False, "use_extra_bufts": use_extra_bufts,
            "warmup": warmup,
            "requests": [{"prompt": list(map(int, r.prompt_token_ids)),
                          "max_tokens": int(r.output_len), "arrival_s": float(o)}
                         for r, o in zip(requests, offsets)]}
    with tempfile.TemporaryDirectory(prefix="hetis-llamacpp-") as tmp:
        spec_f, out_f, err_f = (os.path.join(tmp, n) for n in ("spec.json", "out.json", "log"))
        with open(spec_f, "w") as f:
            json.dump(spec, f)
        t = time.perf_counter()
        with open(err_f, "w") as err:
            rc = subprocess.run([str(py), str(DRIVER), spec_f, out_f], stdout=err,
                                stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t
        if rc != 0 or not os.path.exists(out_f):
            tail = "\n".join(pathlib.Path(err_f).read_text(errors="replace").splitlines()[-15:])
            raise LlamaCppFailed(f"the llama.cpp driver failed (exit {rc}); its log ends:\n{tail}")
        with open(out_f) as f:
            out = json.load(f)
    results, rows = [], out.pop("results")
    for req, r in zip(requests, rows):
        rr = RequestResult(req.prompt_len, req.output_len, send_time=r["send_s"],
                           ttft=r["ttft_s"], latency=r["latency_s"], itl=r["itl_s"],
                           output_tokens=r["output_tokens"])
        rr.success = rr.output_tokens == req.output_len
        rr.error = "" if rr.success else f"{rr.output_tokens} of {req.output_len} tokens"
        results.append(rr)
    metrics = compute_metrics(results, out["duration_s"])
    log(f"baseline: llama.cpp (llama-cpp-python {version}) loaded in {out['load_s']:.1f}s, "
        f"{out['n_slots']} slots, {out['steps']} decode calls; the subprocess took {wall:.1f}s")
    return {**out, "dtype": f"{_gguf_type(path)} (the GGUF's own)", "batch_size": out["n_slots"],
            "model_path": path, "subprocess_s": wall, **metrics,
            "output_token_ids": [r["tokens"] for r in rows]}


def _gguf_type(path: str) -> str:
    name = os.path.basename(path).lower()
    for q in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "bf16", "f32"):
        if f".{q}." in name or name.endswith(f"{q}.gguf"):
            return q.upper()
    return "gguf"


def decode_rate(m: dict) -> float:
    """Decode alone, tok/s per stream: 1000 / mean TPOT (first token to last)."""
    return 1e3 / m["mean_tpot_ms"] if m.get("mean_tpot_ms") else float("nan")


def add_baseline(result: dict, requests, args, log=print) -> dict:
    """Run the llama.cpp side of ``result`` (a ``hetis bench`` result) on ``requests``."""
    from hetis.bench.workloads import arrival_offsets
    offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness,
                              np.random.default_rng([args.seed, 1]))
    n_slots = min(len(requests), args.max_num_seqs, args.max_concurrency or len(requests))
    base = run_llamacpp_baseline(requests, args.model, result["threads"], max(n_slots, 1),
                                 offsets, warmup=not args.no_warmup, log=log)
    result["baseline"] = base
    result["speedup_vs_baseline"] = (result["output_throughput"]
                                     / max(base["output_throughput"], 1e-12))
    result["decode_speedup_vs_baseline"] = decode_rate(result) / decode_rate(base)
    return result


def print_comparison(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    b = result["baseline"]
    t = Table(title=f"Hetis ({result.get('dtype')}, weights {result.get('weights', 'dense')}) "
              f"vs llama.cpp ({b['dtype']}, {b['n_slots']} slots), {result['threads']} threads",
              title_justify="left")
    for c in ("", "Hetis", "llama.cpp", "Hetis / llama.cpp"):
        t.add_column(c, justify="right" if c else "left")
    rows = [("output tok/s (submit to last token)", result["output_throughput"],
             b["output_throughput"]),
            ("decode tok/s per stream (1000 / mean TPOT)", decode_rate(result), decode_rate(b)),
            ("mean TTFT (ms)", result["mean_ttft_ms"], b["mean_ttft_ms"]),
            ("mean end-to-end latency (ms)", result["mean_e2el_ms"], b["mean_e2el_ms"])]
    for name, h, lc in rows:
        t.add_row(name, f"{h:.2f}", f"{lc:.2f}", f"{h / lc:.2f}x")
    (console or Console()).print(t)


# ---------------------------------------------------------------- make bench-llamacpp
WORKLOADS = {
    "64_in_flight": ["--num-prompts", "64", "--input-len-min", "64", "--input-len-max", "512",
                     "--random-output-len", "128"],
    "one_stream": ["--num-prompts", "1", "--random-input-len", "256",
                   "--random-output-len", "128"],
}
_KEEP = ("output_throughput", "total_token_throughput", "duration_s", "mean_ttft_ms",
         "mean_tpot_ms", "median_tpot_ms", "mean_e2el_ms", "completed", "failed",
         "total_input_tokens", "total_output_tokens")


def _cpu() -> str:
    import torch
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    extra = [f for f in ("avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return (f"{model}; torch capability {torch.backends.cpu.get_cpu_capability()}; "
            f"{os.cpu_count()} cores; {' '.join(extra) or 'no AVX-512 BF16/AMX'}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m hetis.bench.llamacpp_baseline",
                                 description="Hetis (bf16, and --weights gguf) against "
                                 "llama.cpp on the issue's workloads; writes the ratios.")
    ap.add_argument("--out", default="bench/results/llamacpp.json")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--weights", nargs="+", choices=("dense", "gguf"), default=["dense", "gguf"])
    ap.add_argument("--kv-cache-dtype", nargs="+", choices=("auto", "int8"), default=["auto"],
                    help="Hetis's KV cache, each in its own pair of runs (llama.cpp keeps its "
                    "default f16 cache; default auto)")
    a = ap.parse_args(argv)
    from hetis.bench.cli import UsageError, run_with_baseline
    from hetis.bench.report import write_json
    from hetis.cli import build_parser
    try:
        check_venv()
    except LlamaCppMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": _cpu(),
           "threads": int(a.threads), "model": gguf_path(None),
           "how": "each pair (Hetis, then llama.cpp on the same requests) back to back in one "
                  "`hetis bench --engine local --baseline llama.cpp` run; greedy, EOS ignored",
           "workloads": {}}
    for name in a.workloads:
        runs = {}
        for w, kv in [(w, kv) for w in a.weights for kv in a.kv_cache_dtype]:
            cmd = ["bench", "--engine", "local", "--threads", a.threads, "--dtype", "bfloat16",
                   "--weights", w, *(["--kv-cache-dtype", kv] if kv != "auto" else []),
                   "--baseline", "llama.cpp", "--disable-tqdm", *WORKLOADS[name]]
            args = build_parser().parse_args(cmd)
            print(f"== {name}, Hetis weights {w}: hetis {' '.join(cmd)}", file=sys.stderr)
            try:
                r = run_with_baseline(args, log=lambda m: print(m, file=sys.stderr))
            except UsageError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            b = r["baseline"]
            key = f"hetis_{'bf16' if w == 'dense' else 'gguf'}" + ("" if kv == "auto" else f"_kv_{kv}")
            runs[key] = {
                "command": "hetis " + " ".join(cmd), "dtype": r.get("dtype"), "weights": w,
                "kv_cache_dtype": kv,
                "hetis": {**{k: r[k] for k in _KEEP}, "decode_tok_s": decode_rate(r)},
                "llamacpp": {**{k: b[k] for k in _KEEP}, "decode_tok_s": decode_rate(b),
                             **{k: b[k] for k in ("llama_cpp_python", "n_slots", "n_ctx",
                                                   "n_batch", "n_ubatch", "kv_unified", "use_extra_bufts",
                                                   "flash_attn_type", "steps", "llama_perf",
                                                   "system_info")}},
                "output_tok_s_ratio": r["speedup_vs_baseline"],
                "decode_tok_s_ratio": r["decode_speedup_vs_baseline"]}
        out["workloads"][name] = runs
        write_json(out, a.out)
    print(json.dumps({n: {k: {"output_ratio": round(v["output_tok_s_ratio"], 3),
                              "decode_ratio": round(v["decode_tok_s_ratio"], 3)}
                          for k, v in runs.items()} for n, runs in out["workloads"].items()},
                     indent=1))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
