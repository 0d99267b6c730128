"""What the allocator tests share: random and Gavel instances, a small pool file, and
the checks that several tiers apply (feasibility, fairness, whole-job rounds)."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from hetis.allocator import gavel
from hetis.allocator.problem import Problem, ef_slack, si_slack
from hetis.allocator.rounds import Rounds

TOL = 1e-6   # the SI and EF slack a result may miss by


@st.composite
def problems(draw, min_n=2, max_n=5, min_m=1, max_m=4, caps=True, weights=True):
    n = draw(st.integers(min_n, max_n))
    m = draw(st.integers(min_m, max_m))
    thr = np.array([[draw(st.one_of(st.just(0.0), st.floats(0.1, 10.0))) if j else draw(st.floats(0.1, 10.0))
                     for j in range(m)] for _ in range(n)])
    for row in thr:                            # the always-positive column moves around
        draw(st.randoms(use_true_random=False)).shuffle(row)
    w = [draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) if weights else 1.0 for _ in range(n)]
    d = [draw(st.one_of(st.just(math.inf), st.integers(1, 12).map(float))) if caps else math.inf for _ in range(n)]
    cap = [float(draw(st.integers(1, 12))) for _ in range(m)]
    return Problem(tuple(f"g{j}" for j in range(m)), np.array(cap), tuple(f"t{i}" for i in range(n)),
                   np.array(w), thr, np.array(d))


def gavel_problem(rng: np.random.Generator, n: int, gpus: dict[str, float], caps: bool = False) -> Problem:
    """Tenants each running one Gavel job type (per-GPU throughput), random weights."""
    jobs = gavel.jobs()
    tenants = []
    for i in range(n):
        j = jobs[rng.integers(len(jobs))]
        thr = {g: v / j["scale_factor"] for g, v in j["throughput_steps_per_s"].items()}
        tenants.append({"name": f"t{i}", "throughput": thr, "weight": float(rng.choice([1, 1, 2, 4])),
                        "max_gpus": float(rng.integers(1, 16)) if caps and rng.random() < 0.3 else None})
    return Problem.build(gpus, tenants)


POOL_YAML = """\
gpus: {v100: 4, p100: 4, k80: 8}
tenants:
  - name: alice
    weight: 1
    throughput: {v100: 4.4, p100: 2.6, k80: 0.6}
    max_gpus: 6
  - name: bob
    job_type: "ResNet-50 (batch size 64)"
  - name: carol
    weight: 2
    throughput: {v100: 1.2, p100: 1.1, k80: 1.0}
"""


def assert_feasible(p, x):
    assert np.all(x >= -1e-9)
    assert np.all(x.sum(axis=0) <= p.capacity * (1 + 1e-9) + 1e-9), "capacity exceeded"
    assert np.all(x.sum(axis=1) <= p.caps * (1 + 1e-9) + 1e-9), "demand cap exceeded"


def fair(p, x):
    return si_slack(p, x).min() >= -TOL and ef_slack(p, x).min() >= -TOL


def run_rounds(p, x, jobs, rounds=100, state=None, t0=0.0):
    """Grant ``rounds`` rounds of x, checking each: capacity kept, every job whole on one type."""
    r = state or Rounds(60.0)
    for k in range(rounds):
        res = r.step(list(p.tenants), list(p.gpu_types), p.capacity, x, jobs, t0 + k)
        granted = np.array([[res.per_tenant[t][g] for g in p.gpu_types] for t in p.tenants])
        assert np.all(granted.sum(axis=0) <= p.capacity), "capacity exceeded in a round"
        for t, js in jobs.items():           # each job is granted whole, on one type
            sizes = dict(js)
            mine = [g for g in res.grants if g.tenant == t]
            assert len({g.job_id for g in mine}) == len(mine)
            assert all(g.gpus == sizes[g.job_id] for g in mine)
    return r, res
