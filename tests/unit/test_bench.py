"""hetis bench: metrics on hand-made timings, workloads, arrivals, and tiny real runs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hetis.bench.metrics import RequestResult, compute_metrics, parse_goodput
from hetis.bench.workloads import (
    SHAREGPT_MEAN_INPUT,
    SHAREGPT_MEAN_OUTPUT,
    arrival_offsets,
    make_requests,
    ordinary_token_ids,
    random_lengths,
    sharegpt_synth_lengths,
)


def _req(ttft, gaps, prompt_len=10, ok=True):
    """A request whose first token came at ``ttft`` s and the rest ``gaps`` s apart."""
    return RequestResult(prompt_len, len(gaps) + 1, success=ok, ttft=ttft,
                         latency=ttft + sum(gaps), itl=list(gaps), output_tokens=len(gaps) + 1)


# ---------------------------------------------------------------- metrics
def test_tpot_excludes_the_first_token():
    r = _req(1.0, [0.1, 0.1, 0.1, 0.1])    # slow prefill, 4 decode gaps of 100 ms
    assert r.tpot == pytest.approx(0.1)
    assert _req(0.5, []).tpot is None       # one token: no TPOT
    m = compute_metrics([r, _req(0.5, [])], duration_s=2.0)
    assert m["mean_tpot_ms"] == pytest.approx(100)   # the one-token request is left out
    assert m["mean_ttft_ms"] == pytest.approx(750)


def test_percentiles_throughputs_and_failures():
    rs = [_req(t / 1000, [0.01] * 9, prompt_len=100) for t in range(1, 101)]  # TTFT 1..100 ms
    rs.append(_req(5.0, [1.0], ok=False))
    m = compute_metrics(rs, duration_s=10.0)
    assert m["completed"] == 100 and m["failed"] == 1
    assert m["median_ttft_ms"] == pytest.approx(50.5)
    assert m["p50_ttft_ms"] == pytest.approx(50.5)
    assert m["p99_ttft_ms"] == pytest.approx(99.01)
    assert m["mean_ttft_ms"] == pytest.approx(50.5)
    assert m["std_ttft_ms"] == pytest.approx(np.std(np.arange(1, 101)))
    assert m["mean_itl_ms"] == pytest.approx(10) and m["std_itl_ms"] == pytest.approx(0, abs=1e-9)
    assert m["total_output_tokens"] == 1000 and m["total_input_tokens"] == 10000
    assert m["request_throughput"] == pytest.approx(10)
    assert m["output_throughput"] == pytest.approx(100)
    assert m["total_token_throughput"] == pytest.approx(1100)
    assert m["mean_e2el_ms"] == pytest.approx(50.5 + 90)


def test_goodput():
    rs = [_req(0.1, [0.02] * 10),   # good
          _req(0.6, [0.02] * 10),   # TTFT too slow
          _req(0.1, [0.06] * 10),   # TPOT too slow
          _req(0.2, [])]            # one token: TPOT counts as 0
    m = compute_metrics(rs, 2.0, parse_goodput(["ttft:500", "tpot:50"]))
    assert m["good_requests"] == 2 and m["request_goodput"] == pytest.approx(1.0)
    m = compute_metrics(rs, 2.0, parse_goodput(["e2el:400"]))
    assert m["good_requests"] == 2          # 0.1 + 0.2 = 0.3 s and 0.2 s
    assert "request_goodput" not in compute_metrics(rs, 2.0)


@pytest.mark.parametrize("bad", ["ttft", "foo:3", "ttft:abc", "tpot:-1"])
def test_goodput_rejects(bad):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput([bad])


# ---------------------------------------------------------------- workloads
def test_random_lengths_in_range_and_seeded():
    inp, out = random_lengths(500, 200, 100, 0.5, np.random.default_rng(1))
    assert inp.min() >= 100 and inp.max() <= 300 and out.min() >= 50 and out.max() <= 150
    assert inp.min() < 110 and inp.max() > 290        # the whole range is used
    inp2, out2 = random_lengths(500, 200, 100, 0.5, np.random.default_rng(1))
    assert (inp == inp2).all() and (out == out2).all()
    inp, out = random_lengths(300, 0, 128, 0.0, np.random.default_rng(2), 64, 512)
    assert inp.min() >= 64 and inp.max() <= 512 and (out == 128).all()
    inp, _ = random_lengths(10, 32, 8, 0.0, np.random.default_rng(2))
    assert (inp == 32).all()
    with pytest.raises(ValueError):
        random_lengths(1, 10, 10, 1.0, np.random.default_rng())


def test_prompts_are_ordinary_tokens_and_seeded():
    ids = ordinary_token_ids(1000, special_ids=range(17))
    assert ids.min() == 17 and ids.size == 983
    a = make_requests([5, 50], [3, 4], ids, np.random.default_rng(7))
    b = make_requests([5, 50], [3, 4], ids, np.random.default_rng(7))
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert [r.prompt_len for r in a] == [5, 50] and [r.output_len for r in a] == [3, 4]
    assert all(17 <= t < 1000 for r in a for t in r.prompt_token_ids)


def test_sharegpt_synth_statistics():
    inp, out = sharegpt_synth_lengths(20000, np.random.default_rng(0), max_model_len=2048)
    assert inp.min() >= 4 and out.min() >= 4 and (inp + out).max() <= 2048 and inp.max() <= 1024
    # means near the published ones (clipping trims them a little), long right tails
    assert 0.85 * SHAREGPT_MEAN_INPUT < inp.mean() < 1.05 * SHAREGPT_MEAN_INPUT
    assert 0.85 * SHAREGPT_MEAN_OUTPUT < out.mean() < 1.05 * SHAREGPT_MEAN_OUTPUT
    assert np.median(inp) < inp.mean() and np.median(out) < out.mean()
    assert np.median(inp) == pytest.approx(SHAREGPT_MEAN_INPUT / math.exp(0.5), rel=0.05)
    small = sharegpt_synth_lengths(2000, np.random.default_rng(0), max_model_len=256)
    assert (small[0] + small[1]).max() <= 256


def test_arrivals():
    rng = np.random.default_rng(3)
    t = arrival_offsets(20001, 4.0, 1.0, rng)
    assert t[0] == 0 and (np.diff(t) >= 0).all()
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)            # exponential: std = mean
    bursty = np.diff(arrival_offsets(20001, 4.0, 0.25, np.random.default_rng(3)))
    regular = np.diff(arrival_offsets(20001, 4.0, 4.0, np.random.default_rng(3)))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert regular.mean() == pytest.approx(0.25, rel=0.03)
    assert bursty.std() > gaps.std() > regular.std()
    assert (arrival_offsets(5, math.inf) == 0).all()
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, 0.0)


class _FakeTarget:
    """Streams ``output_len`` one-token pieces: the first after 50 ms, then every 20 ms."""

    def __init__(self):
        import threading
        self.lock, self.in_flight, self.peak = threading.Lock(), 0, 0

    def stream(self, request_id, prompt_token_ids, output_len):
        import time
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(0.05)
            yield 1
            for _ in range(output_len - 1):
                time.sleep(0.02)
                yield 1
        finally:
            with self.lock:
                self.in_flight -= 1


def test_runner_times_streams_and_limits_concurrency():
    from hetis.bench.runner import run_requests
    from hetis.bench.workloads import BenchRequest
    reqs = [BenchRequest([5] * 8, 4) for _ in range(6)]
    target = _FakeTarget()
    results, duration = run_requests(target, reqs, max_concurrency=2, progress=False)
    assert target.peak == 2 and all(r.success and r.output_tokens == 4 for r in results)
    m = compute_metrics(results, duration)
    assert 45 < m["median_ttft_ms"] < 90 and 18 < m["median_itl_ms"] < 40
    assert 18 < m["median_tpot_ms"] < 40
    assert duration > 3 * 0.11               # three waves of two requests of ~110 ms
    results, _ = run_requests(_FakeTarget(), reqs[:3], request_rate=20.0, progress=False, seed=1)
    sends = sorted(r.send_time for r in results)
    expected = arrival_offsets(3, 20.0, 1.0, np.random.default_rng([1, 1]))
    assert sends == pytest.approx(list(expected), abs=0.02)


def test_cli_usage_errors(capsys):
    from hetis.cli import main
    assert main(["bench", "--engine", "local", "--target", "x:1"]) == 2
    assert main(["bench", "--target", "x:1", "--placement", "0,1,2"]) == 2
    assert main(["bench", "--engine", "local", "--goodput", "ttfx:1"]) == 2
    assert "goodput" in capsys.readouterr().err


def test_every_bench_flag_is_documented():
    import pathlib

    from hetis.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    flags = {o for a in sub.choices["bench"]._actions for o in a.option_strings} - {"-h", "--help"}
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    section = doc[doc.index("### `hetis bench`"):doc.index("### `hetis allocate`")]
    assert not [f for f in sorted(flags) if f"`{f}" not in section]
