"""Why `engine_vs_hf` is bounded on this machine: GEMM speed by dtype, and the
FLOP budget of the benchmark workload for Hetis and for transformers.

Both engines are GEMM-bound. Hetis saves work transformers does (padding to
the longest prompt of each static batch of 8, decode GEMMs at 8 rows instead
of up to 64), but it cannot do fewer FLOPs than the model needs; and without
native bf16 matrix multiplication (AVX-512 BF16 / AMX) a bf16 GEMM is slower,
not faster, than a float32 one, so `dtype="bfloat16"` computes in float32.

    python -m bench.gemm_profile [--threads T] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F


def gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(2):
        F.linear(x, w)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def flop_budget(n_req=64, lo=64, hi=512, out_len=128, batch=8, seed=0) -> dict:
    """GEMM FLOPs of the workload (SmolLM2-135M shapes) for Hetis and for HF static batches."""
    h, inter, layers, vocab, kv = 576, 1536, 30, 49152, 192
    per_tok_layers = 2 * layers * (h * (h + 2 * kv) + h * h + h * 2 * inter + inter * h)
    head = 2 * h * vocab
    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(n_req)]
    hetis_prefill = sum(lens) * per_tok_layers + n_req * head   # logits only for the last token
    hf_prefill = sum(max(lens[i:i + batch]) * len(lens[i:i + batch]) for i in range(0, n_req, batch)) \
        * per_tok_layers + n_req * head
    decode = n_req * out_len * (per_tok_layers + head)
    return {"prompt_tokens": sum(lens), "output_tokens": n_req * out_len,
            "hetis_tflop": (hetis_prefill + decode) / 1e12, "hf_tflop": (hf_prefill + decode) / 1e12,
            "hf_padding_factor": hf_prefill / hetis_prefill}


def main(out_dir: str = "bench/results", threads: int | None = None) -> dict:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    shapes = {"gate_up [576->3072]": (576, 3072), "lm_head [576->49152]": (576, 49152)}
    speed = {}
    for name, (k, n) in shapes.items():
        for m in (8, 64, 512):
            for dt in (torch.float32, torch.bfloat16):
                speed[f"{name} rows={m} {str(dt).replace('torch.', '')}"] = round(gflops(m, k, n, dt), 1)
    budget = flop_budget()
    res = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "gemm_gflops": speed, "flop_budget": budget}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gemm_profile.json"), "w") as f:
        json.dump(res, f, indent=2)
    for k, v in speed.items():
        print(f"{k:45s} {v:7.1f} GFLOPS")
    print(f"workload GEMM work: Hetis {budget['hetis_tflop']:.2f} TFLOP, transformers (batches of 8, "
          f"padded) {budget['hf_tflop']:.2f} TFLOP; prefill padding x{budget['hf_padding_factor']:.2f}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    main(a.out, a.threads)
