"""Integer rounds: convergence to the fractional share, job sizes, leases, few moves."""
import json

import numpy as np
import pytest
from alloc_instances import gavel_problem

from services.allocator import oef
from services.allocator.rounds import Rounds

GPUS = {"v100": 12, "p100": 12, "k80": 20}


def run(p, x, jobs, rounds=100, state=None, t0=0.0):
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


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", [oef.cooperative, oef.noncooperative])
def test_received_share_converges_to_the_fractional_one(seed, mode):
    rng = np.random.default_rng(seed)
    p = gavel_problem(rng, 8, GPUS)
    jobs = {t: [(f"j{k}", 1) for k in range(rng.integers(1, 12))] for t in p.tenants if rng.random() < 0.5}
    p = oef.Problem(p.gpu_types, p.capacity, p.tenants, p.weights, p.throughput,
                    np.array([float(sum(g for _, g in jobs[t])) if t in jobs else np.inf for t in p.tenants]))
    x = mode(p).x
    _, res = run(p, x, jobs)
    for i, t in enumerate(p.tenants):
        for j, g in enumerate(p.gpu_types):
            assert abs(res.received[t][g] - x[i, j]) <= 0.05 * max(x[i, j], 1.0), (t, g)


def test_a_multi_gpu_job_alternates_types_to_meet_its_share():
    p = oef.Problem(("v100", "p100"), np.array([8.0, 8.0]), ("big", "elastic"), np.ones(2),
                    np.array([[2.0, 1.0], [1.0, 1.0]]), np.array([8.0, np.inf]))
    x = np.array([[5.0, 3.0], [3.0, 5.0]])
    _, res = run(p, x, {"big": [("train", 8)]})
    for i, t in enumerate(p.tenants):
        for j, g in enumerate(p.gpu_types):
            assert abs(res.received[t][g] - x[i, j]) <= 0.05 * x[i, j]


def test_a_stable_integer_allocation_keeps_every_job_in_place():
    p = oef.Problem(("v100", "k80"), np.array([4.0, 4.0]), ("a", "b"), np.ones(2),
                    np.array([[3.0, 1.0], [1.0, 1.0]]), np.array([4.0, 4.0]))
    x = np.array([[4.0, 0.0], [0.0, 4.0]])
    jobs = {"a": [("a0", 2), ("a1", 2)], "b": [("b0", 1), ("b1", 3)]}
    r, first = run(p, x, jobs, rounds=1)
    assert first.moves == 0 and not any(g.extended for g in first.grants)
    for k in range(20):
        res = r.step(list(p.tenants), list(p.gpu_types), p.capacity, x, jobs, 100.0 + k)
        assert res.moves == 0
        assert all(g.extended for g in res.grants) and len(res.grants) == 4
        assert all(g.lease_expires == 100.0 + k + 60.0 for g in res.grants)


def test_state_round_trips_through_json_without_changing_the_schedule():
    rng = np.random.default_rng(7)
    p = gavel_problem(rng, 5, GPUS)
    x = oef.cooperative(p).x
    jobs = {"t0": [("a", 2), ("b", 1)], "t1": [("c", 4)]}
    straight, _ = run(p, x, jobs, rounds=30)
    half, _ = run(p, x, jobs, rounds=15)
    restored = Rounds.from_dict(json.loads(json.dumps(half.to_dict())))
    resumed, _ = run(p, x, jobs, rounds=15, state=restored, t0=15.0)
    assert resumed.to_dict() == straight.to_dict()


def test_removed_tenants_are_forgotten():
    p = oef.Problem(("v100",), np.array([4.0]), ("a", "b"), np.ones(2), np.ones((2, 1)), np.full(2, np.inf))
    r, _ = run(p, np.array([[2.0], [2.0]]), {}, rounds=3)
    q = oef.Problem(("v100",), np.array([4.0]), ("a",), np.ones(1), np.ones((1, 1)), np.full(1, np.inf))
    res = r.step(["a"], ["v100"], q.capacity, np.array([[4.0]]), {}, 10.0)
    assert set(r.to_dict()["received"]) == {"a"} and res.per_tenant["a"]["v100"] == 4
