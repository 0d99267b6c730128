"""Integer rounds converge to the fractional share on random Gavel instances (each
instance needs a cooperative solve, up to seconds; the rest of the rounds tests:
tests/unit/allocator/test_rounds.py)."""
import numpy as np
import pytest

from hetis.allocator.cooperative import cooperative
from hetis.allocator.noncooperative import noncooperative
from hetis.allocator.problem import FAIR_TOL, Problem, ef_slack, equal_share_values, utilities
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


def mixed_rounds(rng, p, jobs, k=5):
    """An x that some schedule reaches: a random mix of k feasible integer rounds, each
    filling the whole pool (jobs placed whole on a type with room, elastic tenants'
    GPUs in what is left)."""
    cap = p.capacity.astype(int)
    elastic = [i for i, t in enumerate(p.tenants) if t not in jobs]
    configs = []
    for _ in range(k):
        free, g = cap.copy(), np.zeros((p.n, p.m))
        for i in rng.permutation(p.n):
            for _, size in jobs.get(p.tenants[i], []):
                ok = np.flatnonzero(free >= size)
                if len(ok) and rng.random() < 0.8:
                    j = rng.choice(ok)
                    free[j] -= size
                    g[i, j] += size
        for j in range(p.m):
            for _ in range(free[j]):
                g[rng.choice(elastic), j] += 1
        configs.append(g)
    return np.tensordot(rng.dirichlet(np.ones(k)), np.array(configs), axes=1)


def worst_miss(p, x, res):
    return max(abs(res.received[t][g] - x[i, j]) / max(x[i, j], 1.0)
               for i, t in enumerate(p.tenants) for j, g in enumerate(p.gpu_types))


@pytest.mark.parametrize("seed", range(3))
def test_multi_gpu_jobs_reach_their_share_within_5_percent_over_100_rounds(seed):
    """Jobs of 1, 2, 4 and 8 GPUs in a full pool, x a mix of feasible rounds (so some
    schedule reaches it exactly): every tenant's mean grant per type within 5 % after
    100 rounds. The greedy of one-GPU rounds misses by 10-18 % here (the packed round,
    rounds.pack, by 2-3 %)."""
    rng = np.random.default_rng(seed)
    p = gavel_problem(rng, 8, GPUS)
    jobs = {t: [(f"j{k}", int(rng.choice([1, 2, 4, 8]))) for k in range(rng.integers(1, 5))]
            for t in p.tenants[:6]}
    x = mixed_rounds(rng, p, jobs)
    assert np.allclose(x.sum(axis=0), p.capacity)            # the pool is full: no idle GPU to spare
    _, res = run_rounds(p, x, jobs)
    assert worst_miss(p, x, res) <= 0.05


def jobs_instance(seed):
    """Six of the convergence instances with jobs of 1, 2, 4 and 8 GPUs, caps their totals."""
    rng = np.random.default_rng(seed)
    p = gavel_problem(rng, 8, GPUS)
    jobs = {t: [(f"j{k}", int(rng.choice([1, 2, 4, 8]))) for k in range(rng.integers(1, 5))]
            for t in p.tenants if rng.random() < 0.7}
    p = Problem(p.gpu_types, p.capacity, p.tenants, p.weights, p.throughput,
                np.array([float(sum(g for _, g in jobs[t])) if t in jobs else np.inf for t in p.tenants]))
    return p, jobs


def test_the_job_blind_share_is_out_of_reach():
    """Seed 5, the counter-case: t1's jobs (7 GPUs, its whole cap) must all run on p100
    every round while t0's 8-GPU job needs 8 of the 12 p100 in 27 % of the rounds, so
    no schedule gives t1 more than 6.18 of 7: the job-blind x misses by 12 %."""
    p, jobs = jobs_instance(5)
    x = cooperative(p).x
    _, res = run_rounds(p, x, jobs)
    assert worst_miss(p, x, res) > 0.1


@pytest.mark.parametrize("seed", range(6))
def test_multi_gpu_jobs_reach_the_cooperative_share_within_5_percent_over_100_rounds(seed):
    """With the jobs given, cooperative's x is a mix of feasible rounds (jobs.py), fair
    (EF; SI at the fraction it reports), and the packed rounds reach it within 5 %:
    the job-blind x where the check finds its rounds (SI itself), else column generation's."""
    p, jobs = jobs_instance(seed)
    alloc = cooperative(p, jobs=jobs)
    out = alloc.outcome()
    assert out["implementable"] is True
    assert out["solver"] == "colgen" or (out["solver"] in ("lp", "milp", "ceei") and out["si_fraction"] == 1)
    assert ef_slack(p, alloc.x).min() >= -FAIR_TOL
    assert (utilities(p, alloc.x) >= out["si_fraction"] * equal_share_values(p) * (1 - FAIR_TOL)).all()
    _, res = run_rounds(p, alloc.x, jobs)
    assert worst_miss(p, alloc.x, res) <= 0.05
