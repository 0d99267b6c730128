"""Integer rounds: job sizes, leases, few moves, state that survives JSON (convergence on
random Gavel instances, seconds per instance: tests/integration/test_allocator_rounds.py)."""
import json

import numpy as np

from hetis.allocator.cooperative import cooperative
from hetis.allocator.problem import Problem
from hetis.allocator.rounds import Rounds
from tests.helpers.alloc_instances import gavel_problem, run_rounds

GPUS = {"v100": 12, "p100": 12, "k80": 20}


def test_a_multi_gpu_job_alternates_types_to_meet_its_share():
    p = Problem(("v100", "p100"), np.array([8.0, 8.0]), ("big", "elastic"), np.ones(2),
                np.array([[2.0, 1.0], [1.0, 1.0]]), np.array([8.0, np.inf]))
    x = np.array([[5.0, 3.0], [3.0, 5.0]])
    _, res = run_rounds(p, x, {"big": [("train", 8)]})
    for i, t in enumerate(p.tenants):
        for j, g in enumerate(p.gpu_types):
            assert abs(res.received[t][g] - x[i, j]) <= 0.05 * x[i, j]


def test_a_stable_integer_allocation_keeps_every_job_in_place():
    p = Problem(("v100", "k80"), np.array([4.0, 4.0]), ("a", "b"), np.ones(2),
                np.array([[3.0, 1.0], [1.0, 1.0]]), np.array([4.0, 4.0]))
    x = np.array([[4.0, 0.0], [0.0, 4.0]])
    jobs = {"a": [("a0", 2), ("a1", 2)], "b": [("b0", 1), ("b1", 3)]}
    r, first = run_rounds(p, x, jobs, rounds=1)
    assert first.moves == 0 and not any(g.extended for g in first.grants)
    for k in range(20):
        res = r.step(list(p.tenants), list(p.gpu_types), p.capacity, x, jobs, 100.0 + k)
        assert res.moves == 0
        assert all(g.extended for g in res.grants) and len(res.grants) == 4
        assert all(g.lease_expires == 100.0 + k + 60.0 for g in res.grants)


def test_state_round_trips_through_json_without_changing_the_schedule():
    rng = np.random.default_rng(7)
    p = gavel_problem(rng, 5, GPUS)
    x = cooperative(p).x
    jobs = {"t0": [("a", 2), ("b", 1)], "t1": [("c", 4)]}
    straight, _ = run_rounds(p, x, jobs, rounds=30)
    half, _ = run_rounds(p, x, jobs, rounds=15)
    restored = Rounds.from_dict(json.loads(json.dumps(half.to_dict())))
    resumed, _ = run_rounds(p, x, jobs, rounds=15, state=restored, t0=15.0)
    assert resumed.to_dict() == straight.to_dict()


def test_removed_tenants_are_forgotten():
    p = Problem(("v100",), np.array([4.0]), ("a", "b"), np.ones(2), np.ones((2, 1)), np.full(2, np.inf))
    r, _ = run_rounds(p, np.array([[2.0], [2.0]]), {}, rounds=3)
    q = Problem(("v100",), np.array([4.0]), ("a",), np.ones(1), np.ones((1, 1)), np.full(1, np.inf))
    res = r.step(["a"], ["v100"], q.capacity, np.array([[4.0]]), {}, 10.0)
    assert set(r.to_dict()["received"]) == {"a"} and res.per_tenant["a"]["v100"] == 4
