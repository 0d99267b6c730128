"""weights="gguf" (int4 weight-only projections) against dequantised bf16 weights, in-process.

    .venv/bin/python -m bench.quant [--threads 2] [--prompt 256] [--tokens 128]

1. One stream (issue #13's one-request case): a 256-token prompt, 128 greedy
   output tokens, ``hetis.LLM`` in bfloat16 with weights "dense" then "gguf",
   alternating, three runs each: submit-to-last-token and decode-only tok/s.
2. The accuracy of the int4 path: one-token logits of every equivalence prompt
   against the dense model (max relative difference), and how many greedy tokens
   of each one-stream run agree before the first difference.
Writes bench/results/quant.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from bench.run_all import OUT


def one_stream(llm, prompt: list[int], n: int) -> dict:
    from hetis import SamplingParams
    from hetis.engine.serving import ServingLoop
    loop = ServingLoop(llm.engine, 16).start()
    try:
        t0 = time.perf_counter()
        q = loop.submit("r", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), None)
        times, toks = [], []
        while True:
            o = q.get(timeout=600)
            assert not isinstance(o, Exception), o
            if o.new_token_ids:
                times.append(time.perf_counter())
                toks += o.new_token_ids
            if o.finished:
                break
    finally:
        loop.stop()
    return {"e2e_tok_s": len(toks) / (times[-1] - t0),
            "decode_tok_s": (len(toks) - 1) / (times[-1] - times[0]),
            "ttft_s": times[0] - t0, "tokens": toks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hetis import LLM
    models = {w: LLM(dtype="bfloat16", weights=w) for w in ("dense", "gguf")}
    tok = models["dense"].tokenizer
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(64))
    prompt = tok.encode(text)[: args.prompt]
    res = {"cpu": f"{platform.processor() or 'cpu'}, torch {torch.backends.cpu.get_cpu_capability()}",
           "threads": args.threads, "prompt_tokens": len(prompt), "output_tokens": args.tokens,
           "dtype": "bfloat16", "runs": {"dense": [], "gguf": []}}
    for r in range(args.runs):
        for w, llm in models.items():
            out = one_stream(llm, prompt, args.tokens)
            res["runs"][w].append({k: v for k, v in out.items() if k != "tokens"})
            res.setdefault("tokens", {})[w] = out["tokens"]
            print(f"run {r} {w}: decode {out['decode_tok_s']:.1f} tok/s, e2e {out['e2e_tok_s']:.1f} tok/s",
                  flush=True)
    for w in models:
        runs = res["runs"][w]
        res[w] = {k: sorted(x[k] for x in runs)[len(runs) // 2] for k in runs[0]}  # medians
    res["gguf_vs_dense_decode"] = res["gguf"]["decode_tok_s"] / res["dense"]["decode_tok_s"]
    res["gguf_vs_dense_e2e"] = res["gguf"]["e2e_tok_s"] / res["dense"]["e2e_tok_s"]
    a, b = res.pop("tokens").values()
    res["greedy_tokens_agreeing_before_first_difference"] = next(
        (i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    OUT.mkdir(exist_ok=True)
    with open(OUT / "quant.json", "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: res[k] for k in ("dense", "gguf", "gguf_vs_dense_decode", "gguf_vs_dense_e2e",
                                          "greedy_tokens_agreeing_before_first_difference")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
