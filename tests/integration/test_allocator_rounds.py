"""Integer rounds converge to the fractional share on random Gavel instances (each
instance needs a cooperative solve, up to seconds; the rest of the rounds tests:
tests/unit/allocator/test_rounds.py)."""
import numpy as np
import pytest

from hetis.allocator.cooperative import cooperative
from hetis.allocator.noncooperative import noncooperative
from hetis.allocator.problem import Problem
from tests.helpers.alloc_instances import gavel_problem, run_rounds

GPUS = {"v100": 12, "p100": 12, "k80": 20}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", [cooperative, noncooperative])
def test_received_share_converges_to_the_fractional_one(seed, mode):
    rng = np.random.default_rng(seed)
    p = gavel_problem(rng, 8, GPUS)
    jobs = {t: [(f"j{k}", 1) for k in range(rng.integers(1, 12))] for t in p.tenants if rng.random() < 0.5}
    p = Problem(p.gpu_types, p.capacity, p.tenants, p.weights, p.throughput,
                np.array([float(sum(g for _, g in jobs[t])) if t in jobs else np.inf for t in p.tenants]))
    x = mode(p).x
    _, res = run_rounds(p, x, jobs)
    for i, t in enumerate(p.tenants):
        for j, g in enumerate(p.gpu_types):
            assert abs(res.received[t][g] - x[i, j]) <= 0.05 * max(x[i, j], 1.0), (t, g)


@pytest.mark.xfail(strict=True, reason="open (issue 12, item 4): with the pool fully allocated, "
                   "multi-GPU jobs fragment capacity and the greedy rounds miss the share (docs/allocator.md)")
def test_multi_gpu_jobs_reach_their_share_within_5_percent_over_100_rounds():
    worst = 0.0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        p = gavel_problem(rng, 8, GPUS)
        jobs = {t: [(f"j{k}", int(rng.choice([1, 2, 4, 8]))) for k in range(rng.integers(1, 5))]
                for t in p.tenants if rng.random() < 0.7}
        p = Problem(p.gpu_types, p.capacity, p.tenants, p.weights, p.throughput,
                    np.array([float(sum(g for _, g in jobs[t])) if t in jobs else np.inf for t in p.tenants]))
        x = cooperative(p).x
        _, res = run_rounds(p, x, jobs)
        worst = max(worst, max(abs(res.received[t][g] - x[i, j]) / max(x[i, j], 1.0)
                               for i, t in enumerate(p.tenants) for j, g in enumerate(p.gpu_types)))
    assert worst <= 0.05, worst
