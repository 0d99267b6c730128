"""The steady-state window: SLO percentiles without the warm-up and cool-down requests."""
from __future__ import annotations

import pytest

from hetis.sim.simulator import RequestStats, SimResult


def result(ttfts: list[float]) -> SimResult:
    reqs = [RequestStats(f"r{i:02d}", float(i), 10, 5, first_token_s=i + t, finish_s=i + t + 4 * 0.05)
            for i, t in enumerate(ttfts)]
    return SimResult("d", "hetis", reqs, 30.0, 100, 10, [10], [0.0], 0)


def test_the_window_leaves_out_the_first_and_last_requests_by_arrival():
    # a burst at both ends (slow first tokens), steady in between
    r = result([9.0, 8.0] + [0.5] * 16 + [7.0, 6.0])
    whole, steady = r.summary(), r.summary(steady=0.1)
    assert whole["ttft_p95_s"] > 6 and steady["ttft_p95_s"] == pytest.approx(0.5)
    assert steady["measured_requests"] == 16 and whole["measured_requests"] == 20
    # throughput and completion count every request either way
    assert steady["completed"] == whole["completed"] == 20
    assert steady["output_tok_s"] == whole["output_tok_s"]
    with pytest.raises(ValueError, match="steady"):
        r.summary(steady=0.5)
