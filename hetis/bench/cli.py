"""`hetis bench`: its flags and the command (the benchmark itself is hetis/bench/runner.py)."""
from __future__ import annotations

import argparse
import sys

from hetis.defaults import DEFAULT_DTYPE, DEFAULT_TARGET, DTYPE_NAMES, KV_CACHE_DTYPES, default_target
from hetis.engine.sampling import ParamError
from hetis.mesh.flags import positive_int, positive_rate


class UsageError(Exception):
    """Bad command-line input found after parsing (``hetis`` exits 2)."""


def _placement(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated backend indices, e.g. 0,1,2 "
                                         f"(got {s})") from None


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="serving benchmark: latency and throughput",
                       description="Send a workload to a running cluster (--target), to any "
                       "OpenAI-compatible server (--backend openai --base-url URL) or to the "
                       "in-process engine (--engine local) at a given arrival process and "
                       "report TTFT, TPOT, ITL, end-to-end latency, throughput and goodput, "
                       "like vLLM's benchmark_serving. See docs/cli.md.")
    g = b.add_argument_group("target")
    g.add_argument("--target", default=None, metavar="HOST:PORT",
                   help="a running cluster's router (default: $HETIS_TARGET, else "
                   f"{DEFAULT_TARGET}, unless --engine local)")
    g.add_argument("--engine", choices=["local"], default=None,
                   help="'local': benchmark the in-process engine (hetis.LLM) instead")
    g.add_argument("--backend", choices=["grpc", "openai"], default="grpc",
                   help="how to reach a server: 'grpc' a Hetis router (--target), 'openai' "
                   "any OpenAI-compatible server's streaming /completions (--base-url) "
                   "(default %(default)s)")
    g.add_argument("--base-url", default=None, metavar="URL",
                   help="--backend openai: the API root, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="the server's API key: 'Authorization: Bearer KEY' (openai) or gRPC "
                   "metadata (grpc) (default: $HETIS_API_KEY)")
    g.add_argument("--served-model", default=None, metavar="NAME",
                   help="--backend openai: the 'model' named in requests (default: the first "
                   "one GET /models lists)")
    g.add_argument("--model", default=None, metavar="M",
                   help=".gguf file or HF directory (default: SmolLM2-135M-Instruct); with "
                   "--target or --base-url it only provides the tokenizer and must be the "
                   "server's")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default=DEFAULT_DTYPE,
                   help="local engine's dtype (default %(default)s)")
    g.add_argument("--weights", choices=("dense", "gguf"), default="dense",
                   help="local engine: 'gguf' keeps the GGUF's Q4 projections int4 (default dense)")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="local engine: 'int8' stores the KV cache as int8 rows with a float32 "
                   "scale each (default auto: the model's dtype)")
    g.add_argument("--placement", type=_placement, default=None, metavar="B,B,..",
                   help="local engine: head group -> in-process backend, e.g. 0,1,2")
    g.add_argument("--threads", type=positive_int, default=None, metavar="T",
                   help="torch threads of this process: the local engine and the baseline "
                   "(default: all cores)")
    g.add_argument("--max-num-seqs", type=positive_int, default=64, metavar="N",
                   help="local engine: sequences per step at most (default %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=1024, metavar="N",
                   help="local engine: tokens per step at most (default %(default)s)")
    g.add_argument("--max-model-len", type=positive_int, default=2048, metavar="N",
                   help="local engine: prompt + output tokens at most; --backend openai: "
                   "the server's, unless its /models entry gives it (default %(default)s)")
    g.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="--target or --base-url: deadline per request (default 600 s)")
    g = b.add_argument_group("workload")
    g.add_argument("--dataset", choices=["random", "sharegpt-synth"], default="random",
                   help="request lengths (default %(default)s)")
    g.add_argument("--num-prompts", type=positive_int, default=64, metavar="N",
                   help="requests to send (default %(default)s)")
    g.add_argument("--random-input-len", type=positive_int, default=256, metavar="N",
                   help="random: mean prompt length (default %(default)s)")
    g.add_argument("--random-output-len", type=positive_int, default=128, metavar="N",
                   help="random: mean output length (default %(default)s)")
    g.add_argument("--random-range-ratio", type=float, default=0.0, metavar="R",
                   help="random: lengths uniform in [L*(1-R), L*(1+R)], 0 <= R < 1 "
                   "(default %(default)s)")
    g.add_argument("--input-len-min", type=positive_int, default=None, metavar="N",
                   help="random: prompt lengths uniform in [min, max] instead")
    g.add_argument("--input-len-max", type=positive_int, default=None, metavar="N")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly the output length (implied by --baseline)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature (default 0: greedy)")
    g.add_argument("--seed", type=int, default=0, help="workload and arrivals (default 0)")
    g = b.add_argument_group("arrivals")
    g.add_argument("--request-rate", type=positive_rate, default=float("inf"), metavar="R",
                   help="requests per second; 'inf' sends all at once (default)")
    g.add_argument("--burstiness", type=float, default=1.0, metavar="B",
                   help="gamma shape of the gaps: 1 Poisson, < 1 burstier, > 1 more regular")
    g.add_argument("--max-concurrency", type=positive_int, default=None, metavar="N",
                   help="requests in flight at most (default: unlimited)")
    g = b.add_argument_group("metrics and output")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000")
    g.add_argument("--metric-percentiles", default="50,90,99", metavar="P,P",
                   help="percentiles to report (default %(default)s)")
    g.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="plot latency CDFs etc.")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    g.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up request")
    g = b.add_argument_group("baseline")
    g.add_argument("--baseline", choices=["hf", "llama.cpp"], default=None,
                   help="'hf': also run transformers generate on the same requests; "
                   "'llama.cpp': also run them through llama.cpp on the same GGUF (one KV "
                   "stream per sequence, batched like its server; needs `make "
                   "bench-llamacpp`, docs/bench-llamacpp.md)")
    g.add_argument("--baseline-batch", type=positive_int, default=8, metavar="N",
                   help="static batch size of the hf baseline (default %(default)s)")
    b.set_defaults(func=cmd_bench)
    return b


def _check_target(args) -> None:
    """One target, and only its own flags; --target defaults for the gRPC backend."""
    if args.engine and args.target:
        raise UsageError("give --target (a cluster) or --engine local, not both")
    if args.backend == "openai":
        if args.engine or args.target:
            raise UsageError(f"{'--engine' if args.engine else '--target'}: not with --backend "
                             "openai (its server is --base-url)")
        if not args.base_url:
            raise UsageError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
        return
    openai_only = [f for f, v in [("--base-url", args.base_url),
                                  ("--served-model", args.served_model)] if v is not None]
    if openai_only:
        raise UsageError(f"{', '.join(openai_only)}: only with --backend openai")
    if not args.engine and not args.target:
        args.target = default_target()


def cmd_bench(args) -> int:
    _check_target(args)
    if args.engine != "local":
        local_only = [f for f, v, d in [("--placement", args.placement, None),
                                        ("--dtype", args.dtype, DEFAULT_DTYPE),
                                        ("--weights", args.weights, "dense"),
                                        ("--kv-cache-dtype", args.kv_cache_dtype, "auto")] if v != d]
        if local_only:
            raise UsageError(f"{', '.join(local_only)}: only with --engine local")
    if args.burstiness <= 0:
        raise UsageError(f"--burstiness: must be > 0 (got {args.burstiness})")
    if args.baseline == "llama.cpp":
        from hetis.bench.llamacpp_baseline import LlamaCppMissing, check_venv
        if args.temperature != 0:
            raise UsageError("--baseline llama.cpp: greedy only (--temperature 0)")
        try:   # before the model loads: a missing venv costs no benchmark
            check_venv()
        except LlamaCppMissing as e:
            raise UsageError(str(e)) from None
    from hetis.bench.targets import OpenAIRequestError
    try:
        result = run_with_baseline(args, log=lambda msg: print(msg, file=sys.stderr))
    except OpenAIRequestError as e:  # the server refused or did not answer: exit 1, like gRPC's
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from hetis.bench.llamacpp_baseline import LlamaCppFailed
        if not isinstance(e, LlamaCppFailed):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ParamError as e:  # a bad flag value, named by the flag's field
        raise UsageError(f"--{e.param.replace('_', '-')}: {e.reason}") from None
    except ValueError as e:
        from hetis.client import HetisError
        if isinstance(e, HetisError):  # the server's InvalidArgument: exit 1 like other commands
            raise
        raise UsageError(str(e)) from None
    return 0 if result["completed"] else 1




def run_with_baseline(args, log=print) -> dict:
    """``hetis bench``'s run, then with ``--baseline llama.cpp`` the same requests through
    llama.cpp (hetis/bench/llamacpp_baseline.py); the result written and printed once."""
    from hetis.bench.runner import run
    if args.baseline != "llama.cpp":
        return run(args, log=log)
    from hetis.bench import report
    from hetis.bench.llamacpp_baseline import add_baseline, print_comparison
    from hetis.bench.workloads import build_workload, tokenizer_token_ids
    from hetis.model.loader import load_meta
    if not args.ignore_eos:
        log("--baseline llama.cpp: implying --ignore-eos so both sides generate the same lengths")
        args.ignore_eos = True
    out, plot = args.out, args.plot
    args.out = args.plot = None
    args.baseline = None
    try:
        result = run(args, log=log)
    finally:
        args.out, args.plot, args.baseline = out, plot, "llama.cpp"
    # the same requests again (build_workload is seeded by --seed): checked against the run's
    requests = build_workload(args, tokenizer_token_ids(load_meta(args.model)[1]),
                              args.max_model_len)
    ran = [(r["prompt_len"], r["expected_output_len"]) for r in result["requests"]]
    if ran != [(r.prompt_len, r.output_len) for r in requests]:
        raise RuntimeError("--baseline llama.cpp: rebuilding the workload gave other requests")
    add_baseline(result, requests, args, log=log)
    print_comparison(result)
    if args.out:
        report.write_json(result, args.out)
        log(f"wrote {args.out}")
    if args.plot:
        report.plot(result, args.plot)
        log(f"wrote {args.plot}")
    return result
