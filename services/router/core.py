"""The router's executor: ``Executor``'s interface carried out by a dense worker over gRPC.

The loop that steps the engine is hetis/serving.py (shared with the local benchmark).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import Counter

from hetis.attention import AttnItem
from hetis.executor import StepChunk
from hetis.v1 import worker_pb2

STEP_TIME = Counter("hetis:step_seconds_total", "router step time by part", ["part"])


@dataclass
class StepStats:
    """Where the router's steps spend their time (cumulative)."""
    steps: int = 0
    rpc_s: float = 0.0          # whole Step call as seen by the router
    dense_total_s: float = 0.0  # inside the dense worker
    dense_s: float = 0.0
    local_attn_s: float = 0.0
    exchange_wait_s: float = 0.0


class RemoteExecutor:
    """``Executor``'s interface, executed by a dense worker over gRPC."""

    def __init__(self, stub, timeout: float = 120.0):
        self.stub, self.timeout = stub, timeout
        self.stats = StepStats()
        self._step_id = 0

    def execute(self, chunks: list[StepChunk], items: list[list[AttnItem]], freed=()) -> list[int]:
        self._step_id += 1
        req = worker_pb2.StepRequest(step_id=self._step_id, freed_seq_ids=list(freed))
        for c in chunks:
            spec = req.chunks.add(seq_id=c.seq_id, start=c.start, token_ids=c.token_ids, sample=c.sample)
            if c.sample:
                p = c.params
                spec.temperature, spec.top_p, spec.top_k = p.temperature, p.top_p, p.top_k
                if p.seed is not None:
                    spec.seed = p.seed
        for b, its in enumerate(items):
            if its:
                w = req.work.add(backend=b)
                for it in its:
                    w.items.add(seq_id=it.seq_id, group=it.group, start=it.start, num_new=it.num_new,
                                blocks=it.blocks)
        t0 = time.perf_counter()
        resp = self.stub.Step(req, timeout=self.timeout)
        s, t = self.stats, resp.timings
        s.steps += 1
        s.rpc_s += time.perf_counter() - t0
        s.dense_total_s += t.total_s
        s.dense_s += t.dense_s
        s.local_attn_s += t.local_attn_s
        s.exchange_wait_s += t.exchange_wait_s
        for part, v in (("step_call", time.perf_counter() - t0), ("dense_worker", t.total_s),
                        ("dense_compute", t.dense_s), ("local_attn", t.local_attn_s),
                        ("exchange_wait", t.exchange_wait_s)):
            STEP_TIME.labels(part).inc(v)
        return list(resp.token_ids)


