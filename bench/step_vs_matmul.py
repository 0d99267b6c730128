"""How close a decode step is to its matrix multiplications alone.

Builds ``hetis.LLM`` (bfloat16 by default), fills a batch of 32 sequences with
prompts of 64-512 tokens, then times, interleaved so machine noise hits both
alike: (a) a whole decode step (``engine.step``: scheduling, projections,
paged attention, MLP, LM head, sampling, detokenisation) and (b) only that
step's GEMMs (QKV, O, gate/up, down for every layer, and the LM head, on 32
rows, with the model's own weights and compute dtype). Reports the median of
each and their ratio, plus a profile of where the rest goes. Both run on the
process's compute thread, as every step does in serving (hetis/model/compute.py:
steps on another thread would pay for a second OpenMP team).

    python -m bench.step_vs_matmul [--dtype bfloat16] [--kv-cache-dtype auto|int8] [--batch 32]
        [--steps 12] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import time

import torch
import torch.nn.functional as F

from hetis.defaults import DTYPE_NAMES, KV_CACHE_DTYPES


def matmuls_only(model, x: torch.Tensor) -> None:
    for L in model.layers:
        F.linear(x, L["qkv"])
        F.linear(x, L["o"])
        gu = F.linear(x, L["gate_up"])
        F.linear(gu[:, : gu.shape[1] // 2], L["down"])
    F.linear(x, model.lm_head)


def main(out_dir: str = "bench/results", dtype: str = "bfloat16", batch: int = 32, steps: int = 12,
         threads: int | None = None, seed: int = 0, kv_cache_dtype: str = "auto") -> dict:
    from hetis import LLM, SamplingParams
    from hetis.model import compute
    if threads:
        torch.set_num_threads(threads)
    llm = LLM(dtype=dtype, max_num_seqs=batch, max_num_batched_tokens=4096, kv_cache_dtype=kv_cache_dtype)
    eng, model = llm.engine, llm.engine.executor.model
    rng = random.Random(seed)
    vocab = model.cfg.vocab_size
    sp = SamplingParams(temperature=0, max_tokens=10 ** 6 // 1000, ignore_eos=True)
    for i in range(batch):
        ids = [rng.randrange(100, vocab - 100) for _ in range(rng.randint(64, 512))]
        eng.add_request(f"b{i}", ids, sp)
    while any(s.num_computed < len(s.prompt_token_ids) for s in eng.seqs.values()):
        compute.run(eng.step)  # prefill everything first: what follows are pure decode steps
    x = torch.randn(batch, model.cfg.hidden_size, dtype=model.compute_dtype)
    step_t, mm_t = [], []
    for _ in range(2):  # warm-up
        compute.run(eng.step)
        compute.run(matmuls_only, model, x)
    prof = cProfile.Profile()
    for i in range(steps):
        t0 = time.perf_counter()
        compute.run(torch.inference_mode()(matmuls_only), model, x)
        mm_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        # the last step profiled (cProfile sees only the thread it is enabled on)
        outs = compute.run(prof.runcall if i == steps - 1 else (lambda f: f()), eng.step)
        step_t.append(time.perf_counter() - t0)
        assert len(outs) == batch, "every step must be a full decode batch"
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    res = {
        "dtype": dtype, "kv_cache_dtype": kv_cache_dtype, "compute_dtype": str(model.compute_dtype).replace("torch.", ""),
        "batch": batch, "threads": torch.get_num_threads(),
        "mean_context": statistics.mean(s_.num_tokens for s_ in eng.seqs.values()),
        "step_ms": statistics.median(step_t) * 1e3, "matmul_ms": statistics.median(mm_t) * 1e3,
    }
    res["step_vs_matmul"] = res["step_ms"] / res["matmul_ms"]
    res["profile_last_step"] = s.getvalue()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "step_vs_matmul.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"decode step at batch {batch} ({dtype}, KV cache {kv_cache_dtype}, GEMMs in {res['compute_dtype']}, "
          f"{res['threads']} threads, mean context {res['mean_context']:.0f}): "
          f"step {res['step_ms']:.1f} ms, matmuls alone {res['matmul_ms']:.1f} ms, "
          f"ratio {res['step_vs_matmul']:.2f}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    main(a.out, a.dtype, a.batch, a.steps, a.threads, kv_cache_dtype=a.kv_cache_dtype)
