"""``hetis bench``: send a workload to a target at a given arrival process, measure it.

One thread per request (a request waits for its send time, then for a
``--max-concurrency`` slot, then streams); the main thread waits for them all.
"""
from __future__ import annotations

import math
import os
import threading
import time
import uuid
from datetime import datetime, timezone

import numpy as np

from hetis.bench.metrics import RequestResult, compute_metrics, parse_goodput
from hetis.bench.workloads import arrival_offsets, build_workload, tokenizer_token_ids
from hetis.engine.sampling import ParamError


def run_requests(target, requests, request_rate: float = math.inf, burstiness: float = 1.0,
                 max_concurrency: int | None = None, seed: int = 0,
                 progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send ``requests`` to ``target``; (per-request results, wall-clock duration in s)."""
    offsets = arrival_offsets(len(requests), request_rate, burstiness,
                              np.random.default_rng([seed, 1]))
    slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
    results: list[RequestResult | None] = [None] * len(requests)
    run_id = uuid.uuid4().hex[:8]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc="bench", unit="req")

    def one(i: int) -> None:
        req = requests[i]
        r = RequestResult(req.prompt_len, req.output_len)
        if slots:
            slots.acquire()
        try:
            st = time.perf_counter()
            r.send_time, last = st - t0, st
            for n in target.stream(f"bench-{run_id}-{i}", req.prompt_token_ids, req.output_len):
                now = time.perf_counter()
                if r.output_tokens == 0:
                    r.ttft = now - st
                else:
                    r.itl.append(now - last)
                r.output_tokens += n
                last = now
            r.latency = last - st
            r.success = r.output_tokens > 0
            r.error = "" if r.success else "no output"
        except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
            r.error = f"{type(e).__name__}: {' '.join(str(e).split())}"
        finally:
            if slots:
                slots.release()
        results[i] = r
        if bar:
            bar.update(1)

    threads = []
    t0 = time.perf_counter()
    for i, off in enumerate(offsets):
        delay = t0 + off - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(i,), name=f"bench-{i}", daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    duration = time.perf_counter() - t0
    if bar:
        bar.close()
    return results, duration


def request_rows(results: list[RequestResult]) -> list[dict]:
    return [{"prompt_len": r.prompt_len, "expected_output_len": r.expected_output_len,
             "output_tokens": r.output_tokens, "success": r.success, "error": r.error,
             "send_time_s": r.send_time, "ttft_ms": r.ttft * 1e3, "e2el_ms": r.latency * 1e3,
             "tpot_ms": None if r.tpot is None else r.tpot * 1e3,
             "itl_ms": [g * 1e3 for g in r.itl]} for r in results]


def make_target(args):
    from hetis.bench.targets import ClusterTarget, LocalTarget, OpenAITarget
    if args.engine == "local":
        return LocalTarget(args.model, args.dtype, args.placement, args.max_num_seqs,
                           args.max_num_batched_tokens, args.max_model_len,
                           temperature=args.temperature, ignore_eos=args.ignore_eos,
                           weights=args.weights, kv_cache_dtype=args.kv_cache_dtype)
    if args.backend == "openai":
        from hetis.model.loader import load_meta
        _, tokenizer = load_meta(args.model)
        return OpenAITarget(args.base_url, tokenizer, args.max_model_len,
                            api_key=args.api_key or os.environ.get("HETIS_API_KEY"),
                            served_model=args.served_model, timeout=args.timeout,
                            temperature=args.temperature, ignore_eos=args.ignore_eos)
    return ClusterTarget(args.target, args.model, args.timeout,
                         temperature=args.temperature, ignore_eos=args.ignore_eos,
                         api_key=args.api_key)


def run(args, log=print) -> dict:
    """The whole of ``hetis bench`` after parsing; returns the result dict (also written
    to ``args.out``/``args.plot`` when given). Raises ValueError for bad input."""
    import torch
    slo = parse_goodput(args.goodput)
    percentiles = parse_percentiles(args.metric_percentiles)
    if args.baseline == "hf" and not args.ignore_eos:
        log("--baseline hf: implying --ignore-eos so both sides generate the same lengths")
        args.ignore_eos = True
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    t_load = time.perf_counter()
    target = make_target(args)
    try:
        log(f"target: {target.description['target']} (loaded in "
            f"{time.perf_counter() - t_load:.1f}s, max_model_len {target.max_model_len})")
        requests = build_workload(args, tokenizer_token_ids(target.tokenizer), target.max_model_len)
        if not args.no_warmup and requests:   # first-call costs stay out of the numbers
            list(target.stream(f"warmup-{uuid.uuid4().hex[:8]}", requests[0].prompt_token_ids,
                               min(requests[0].output_len, 4)))
        rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
        log(f"{len(requests)} requests ({args.dataset}), rate {rate}, burstiness "
            f"{args.burstiness:g}, max concurrency {args.max_concurrency or 'unlimited'}")
        results, duration = run_requests(target, requests, args.request_rate, args.burstiness,
                                         args.max_concurrency, args.seed,
                                         progress=not args.disable_tqdm)
        description = dict(target.description)
    finally:
        target.close()
    metrics = compute_metrics(results, duration, slo, percentiles)
    failures = [r.error for r in results if not r.success]
    if failures:
        log(f"{len(failures)} request(s) failed; first: {failures[0]}")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "backend": "hetis", **description, "model": args.model or "SmolLM2-135M-Instruct",
              "threads": threads, "dataset": args.dataset, "num_prompts": len(requests),
              "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              "ignore_eos": args.ignore_eos, "temperature": args.temperature, "seed": args.seed,
              "percentiles": list(percentiles), **metrics}
    if args.baseline == "hf":
        from hetis.bench.hf_baseline import load_hf_model, run_hf_baseline
        t = time.perf_counter()
        model = load_hf_model(args.model)
        log(f"baseline: transformers loaded in {time.perf_counter() - t:.1f}s; generating in "
            f"batches of {args.baseline_batch}")
        pad = (target.tokenizer.eos_token_ids or (0,))[0]
        base = run_hf_baseline(requests, model, args.baseline_batch, pad,
                               progress=not args.disable_tqdm)
        result["baseline"] = base
        result["speedup_vs_baseline"] = (metrics["output_throughput"]
                                         / max(base["output_throughput"], 1e-12))
    result["requests"] = request_rows(results)
    from hetis.bench import report
    report.print_summary(result)
    if args.out:
        report.write_json(result, args.out)
        log(f"wrote {args.out}")
    if args.plot:
        report.plot(result, args.plot)
        log(f"wrote {args.plot}")
    return result


def parse_percentiles(s: str) -> tuple[float, ...]:
    try:
        ps = tuple(float(x) for x in str(s).split(",") if x.strip())
    except ValueError:
        raise ParamError("metric_percentiles", f"{s!r} is not a comma-separated list of numbers") \
            from None
    if not ps or any(not 0 < p < 100 for p in ps):
        raise ParamError("metric_percentiles", f"each must be in (0, 100) (got {s!r})")
    return ps
