"""Serving metrics from per-request timings (vLLM benchmark_serving's definitions).

- TTFT: send -> first output token.
- TPOT: (latency - TTFT) / (output tokens - 1): time per output token after the
  first; undefined (left out) for one-token outputs.
- ITL: every gap between consecutive streamed chunks, pooled over all requests.
- E2EL: send -> last token.
- Throughputs divide by the benchmark's wall-clock duration.
- Goodput: requests per second that met every SLO given (``ttft:MS tpot:MS
  e2el:MS``); a one-token request counts as TPOT 0 there, as in vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hetis.engine.sampling import ParamError

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    send_time: float = 0.0          # seconds from the benchmark start
    ttft: float = 0.0               # seconds
    latency: float = 0.0            # seconds, send -> last token
    itl: list[float] = field(default_factory=list)   # gaps between chunks after the first
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ParamError("goodput", f"{item!r} is not NAME:MS with NAME one of "
                             f"{', '.join(SLO_METRICS)}")
        try:
            v = float(value)
        except ValueError:
            raise ParamError("goodput", f"{item!r}: {value!r} is not a number") from None
        if v < 0:
            raise ParamError("goodput", f"{item!r}: the SLO must be >= 0 ms")
        out[name] = v
    return out


def summarize(values_s, name: str, percentiles=PERCENTILES) -> dict[str, float]:
    """mean/median/std/pNN of ``values_s`` (seconds), in ms; zeros when empty (like vLLM)."""
    a = np.asarray(values_s, dtype=float) * 1e3
    if a.size == 0:
        a = np.zeros(1)
    d = {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
         f"std_{name}_ms": float(a.std())}
    for p in percentiles:
        d[f"p{p:g}_{name}_ms"] = float(np.percentile(a, p))
    return d


def is_good(r: RequestResult, slo_ms: dict[str, float]) -> bool:
    got = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(got[k] * 1e3 <= v for k, v in slo_ms.items())


def compute_metrics(results: list[RequestResult], duration_s: float,
                    goodput_slo_ms: dict[str, float] | None = None,
                    percentiles=PERCENTILES) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    m = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
         "total_input_tokens": total_in, "total_output_tokens": total_out,
         "request_throughput": len(ok) / dur, "output_throughput": total_out / dur,
         "total_token_throughput": (total_in + total_out) / dur}
    if goodput_slo_ms:
        good = sum(is_good(r, goodput_slo_ms) for r in ok)
        m["goodput_slo_ms"] = dict(goodput_slo_ms)
        m["good_requests"] = good
        m["request_goodput"] = good / dur
    m.update(summarize([r.ttft for r in ok], "ttft", percentiles))
    m.update(summarize([r.tpot for r in ok if r.tpot is not None], "tpot", percentiles))
    m.update(summarize([g for r in ok for g in r.itl], "itl", percentiles))
    m.update(summarize([r.latency for r in ok], "e2el", percentiles))
    return m
