"""Random allocation instances shared by the allocator tests."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from services.allocator import gavel
from services.allocator.oef import Problem


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
