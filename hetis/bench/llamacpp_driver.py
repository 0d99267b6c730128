"""Run a ``hetis bench`` workload through llama.cpp; runs in the llama.cpp venv, not Hetis's.

    .venv-llamacpp/bin/python hetis/bench/llamacpp_driver.py SPEC.json RESULT.json

It imports only the standard library, numpy and ``llama_cpp`` (llama-cpp-python's
ctypes bindings to libllama): the Hetis environment never imports llama.cpp and this
environment never imports Hetis or torch. ``hetis/bench/llamacpp_baseline.py`` writes
SPEC.json, starts this script and reads RESULT.json.

What it does is what llama.cpp's own server does with ``-np N`` slots: one
``llama_context`` whose KV cache holds one stream per sequence (``kv_unified`` off,
``n_seq_max = N``, the server's default when the slot count is given), and a loop
that, every iteration, makes one ``llama_batch`` of one decode token per generating
sequence plus prompt tokens of the sequences still in prefill (up to ``n_batch``
tokens; libllama splits it into ``n_ubatch`` pieces), then one ``llama_decode``.
Requests join as they arrive and a slot is free, and leave when they have
``max_tokens`` tokens (EOS is ignored: the length is the workload's). Greedy: the
argmax of each sequence's logits. The prompt token ids are the workload's own, not
re-tokenised text.

SPEC.json: ``{"model": PATH, "threads": T, "n_slots": N, "n_batch": B, "n_ubatch": U,
"kv_unified": false, "use_extra_bufts": false, "warmup": true, "requests": [{"prompt": [ids], "max_tokens": M,
"arrival_s": S}, ...]}``. RESULT.json: per request ``send_s`` (from the start),
``ttft_s``, ``latency_s`` (send to last token), ``itl_s``, ``output_tokens`` and
``tokens``; the run's ``duration_s`` (start to the last request's last token), the
context's settings and libllama's own timings (``llama_perf_context``).
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque


def _ctx_per_slot(requests: list[dict]) -> int:
    need = max(len(r["prompt"]) + r["max_tokens"] for r in requests)
    return -(-need // 256) * 256


class _Seq:
    __slots__ = ("i", "seq_id", "prompt", "max_tokens", "n_past", "tokens", "send",
                 "first", "last", "itl", "out_idx")

    def __init__(self, i: int, seq_id: int, req: dict, send: float):
        self.i, self.seq_id, self.send = i, seq_id, send
        self.prompt, self.max_tokens = req["prompt"], req["max_tokens"]
        self.n_past = 0          # tokens already in this sequence's KV stream
        self.tokens: list[int] = []
        self.first = self.last = None
        self.itl: list[float] = []
        self.out_idx = -1        # this sequence's row of logits in the current batch


def run(spec: dict) -> dict:
    import numpy as np

    import llama_cpp as L
    requests = spec["requests"]
    threads = int(spec["threads"])
    n_slots = max(1, min(int(spec["n_slots"]), len(requests)))
    n_batch, n_ubatch = int(spec.get("n_batch", 2048)), int(spec.get("n_ubatch", 512))
    per_slot = _ctx_per_slot(requests)

    L.llama_backend_init()
    t = time.perf_counter()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    # llama.cpp's --no-repack: its extra buffer types (AMX, CPU repacking) off unless asked
    # for; on AVX-512 AMX Xeons its AMX matmul segfaults on Q4_1 batches of 2+ tokens
    mparams.use_extra_bufts = bool(spec.get("use_extra_bufts", False))
    model = L.llama_model_load_from_file(spec["model"].encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['model']}")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = per_slot * n_slots
    cparams.n_batch, cparams.n_ubatch = n_batch, n_ubatch
    cparams.n_seq_max = n_slots
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.kv_unified = bool(spec.get("kv_unified", False))
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create the context")
    load_s = time.perf_counter() - t
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(n_batch, 0, 1)

    def add(k: int, tok: int, pos: int, seq_id: int, logits: bool) -> None:
        batch.token[k] = tok
        batch.pos[k] = pos
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = seq_id
        batch.logits[k] = 1 if logits else 0

    def decode(n: int) -> None:
        batch.n_tokens = n
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1: no KV slot for the batch)")

    def argmax(k: int) -> int:
        p = L.llama_get_logits_ith(ctx, k)
        return int(np.ctypeslib.as_array(p, shape=(n_vocab,)).argmax())

    if spec.get("warmup", True) and requests:   # first-call costs stay out of the numbers
        p = requests[0]["prompt"][:8]
        for k, tok in enumerate(p):
            add(k, tok, k, 0, k == len(p) - 1)
        decode(len(p))
        add(0, argmax(len(p) - 1), len(p), 0, True)
        decode(1)
        L.llama_memory_clear(mem, True)
    L.llama_perf_context_reset(ctx)

    order = sorted(range(len(requests)), key=lambda i: requests[i].get("arrival_s", 0.0))
    pending = deque(order)
    free = list(range(n_slots - 1, -1, -1))
    active: list[_Seq] = []
    done: dict[int, _Seq] = {}
    steps, step_tokens = 0, 0
    t0 = time.perf_counter()
    while len(done) < len(requests):
        now = time.perf_counter()
        while pending and free and requests[pending[0]].get("arrival_s", 0.0) <= now - t0:
            i = pending.popleft()
            active.append(_Seq(i, free.pop(), requests[i],
                               t0 + requests[i].get("arrival_s", 0.0)))
        if not active:
            if not free:
                raise RuntimeError("no sequence runs and no slot is free")
            time.sleep(max(0.0, t0 + requests[pending[0]]["arrival_s"] - time.perf_counter()))
            continue
        n = 0
        for s in active:                      # one decode token per generating sequence
            s.out_idx = -1
            if s.tokens:
                add(n, s.tokens[-1], s.n_past, s.seq_id, True)
                s.out_idx, n, s.n_past = n, n + 1, s.n_past + 1
        for s in active:                      # then prompt chunks, in arrival order
            if s.tokens or n >= n_batch:
                continue
            take = min(len(s.prompt) - s.n_past, n_batch - n)
            for j in range(take):
                pos = s.n_past + j
                last = pos == len(s.prompt) - 1
                add(n + j, s.prompt[pos], pos, s.seq_id, last)
                if last:
                    s.out_idx = n + j
            n, s.n_past = n + take, s.n_past + take
        decode(n)
        steps, step_tokens = steps + 1, step_tokens + n
        outs = [(s, argmax(s.out_idx)) for s in active if s.out_idx >= 0]
        now = time.perf_counter()
        for s, tok in outs:
            s.tokens.append(tok)
            if s.first is None:
                s.first = now
            else:
                s.itl.append(now - s.last)
            s.last = now
            if len(s.tokens) >= s.max_tokens:
                L.llama_memory_seq_rm(mem, s.seq_id, -1, -1)
                free.append(s.seq_id)
                done[s.i] = s
        active = [s for s in active if s.i not in done]
    duration = time.perf_counter() - t0
    perf = L.llama_perf_context(ctx)
    out = {"name": "llama.cpp", "llama_cpp_python": L.__version__,
           "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
           "threads": threads, "n_slots": n_slots, "n_ctx": L.llama_n_ctx(ctx),
           "n_ctx_per_slot": per_slot, "n_batch": n_batch, "n_ubatch": n_ubatch,
           "kv_unified": bool(cparams.kv_unified), "use_extra_bufts": bool(mparams.use_extra_bufts), "flash_attn_type": int(cparams.flash_attn_type),
           "load_s": load_s, "duration_s": duration, "steps": steps,
           "mean_step_tokens": step_tokens / max(steps, 1),
           "llama_perf": {"t_p_eval_ms": perf.t_p_eval_ms, "t_eval_ms": perf.t_eval_ms,
                          "n_p_eval": perf.n_p_eval, "n_eval": perf.n_eval},
           "results": [{"send_s": done[i].send - t0, "ttft_s": done[i].first - done[i].send,
                        "latency_s": done[i].last - done[i].send, "itl_s": done[i].itl,
                        "output_tokens": len(done[i].tokens), "tokens": done[i].tokens}
                       for i in range(len(requests))]}
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: llamacpp_driver.py SPEC.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    result = run(spec)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
