"""jobs.py: with multi-GPU jobs cooperative's x is a mix of feasible rounds, fair at the SI
fraction it reports, and as efficient as any such mix (the rounds reaching it over 100
rounds: tests/integration/test_allocator_rounds.py)."""
import json
import math

import numpy as np
import pytest

from hetis.allocator import cli as allocate_cli
from hetis.allocator.cooperative import cooperative
from hetis.allocator.jobs import implementable, job_sizes, schedule
from hetis.allocator.problem import FAIR_TOL, Problem, ef_slack, equal_share_values, si_slack, utilities


def pool(gpus, tenants):
    """tenants: [(name, {type: throughput}, jobs)], caps at the jobs' total."""
    return (Problem.build(gpus, [{"name": n, "throughput": thr,
                                  "max_gpus": sum(g for _, g in js) if js else None} for n, thr, js in tenants]),
            {n: js for n, _, js in tenants if js})


def check_schedule(p, alloc):
    """x of the job tenants is the schedule's mix, and every configuration fits the pool."""
    sched = alloc.info["_schedule"]
    assert sum(w for w, _ in sched) <= 1 + 1e-9
    idx = [p.tenants.index(t) for t in alloc.info["job_tenants"]]
    mix = sum(w * a for w, a in sched)
    assert np.allclose(mix, alloc.x[idx], atol=1e-7)
    for _, a in sched:
        assert (a.sum(axis=0) <= p.capacity + 1e-9).all() and np.allclose(a, np.round(a))


def test_the_job_blind_optimum_is_kept_where_rounds_reach_it():
    """t0's 8-GPU job fits the 8 a100 it values most, so the job-blind optimum (stage 1,
    then the Pareto stages) is a mix of rounds: kept, SI itself, with its own solver."""
    p, jobs = pool({"a100": 8, "t4": 8}, [("t0", {"a100": 2.0, "t4": 1.0}, [("big", 8)]),
                                          ("t1", {"a100": 1.0, "t4": 1.0}, [])])
    alloc = cooperative(p, jobs=jobs)
    out = alloc.outcome()
    assert out["implementable"] is True and out["si_fraction"] == 1.0 and out["solver"] in ("lp", "milp", "ceei")
    assert out["pareto_efficient"] is True and si_slack(p, alloc.x).min() >= -FAIR_TOL
    assert np.allclose(alloc.x, cooperative(p).x)
    check_schedule(p, alloc)


def test_two_8_gpu_jobs_on_12_gpus_share_8_and_say_si_is_out_of_reach():
    p, jobs = pool({"a100": 12}, [("t0", {"a100": 1.0}, [("big", 8)]), ("t1", {"a100": 1.0}, [("big", 8)])])
    blind = cooperative(p)
    assert np.allclose(blind.x.ravel(), [6, 6])          # what the job-blind LP promises: unreachable
    alloc = cooperative(p, jobs=jobs)
    out = alloc.outcome()
    assert np.allclose(alloc.x.ravel(), [4, 4], atol=1e-6)  # one job at a time, half the rounds each
    assert out["implementable"] is True and out["si_fraction"] == pytest.approx(4 / 6)
    assert out["stage"] == "fair_optimum" and out["solver"] == "colgen" and out["optimality_gap"] == 0
    check_schedule(p, alloc)


def test_one_gpu_jobs_take_the_job_blind_path():
    p, jobs = pool({"a100": 4, "t4": 8}, [("a", {"a100": 3, "t4": 1}, [("j", 1)] * 3),
                                          ("b", {"a100": 2, "t4": 1}, None)])
    assert job_sizes(p, jobs) == {} and implementable(p, jobs) is None
    out = cooperative(p, jobs=jobs).outcome()
    assert out["implementable"] is None and out["si_fraction"] is None and out["solver"] != "colgen"


def random_pool(seed):
    rng = np.random.default_rng(seed)
    types = {"a100": 8, "v100": 12, "t4": 16}
    tenants = []
    for i in range(7):
        thr = dict(zip(types, np.sort(rng.uniform(0.2, 1.0, 3))[::-1] * rng.uniform(1, 4, 3)))
        js = [(f"j{k}", int(rng.choice([1, 2, 4, 8]))) for k in range(rng.integers(1, 4))] if i < 5 else None
        tenants.append((f"t{i}", thr, js))
    return pool(types, tenants)


@pytest.mark.parametrize("seed", range(4))
def test_fair_at_its_fraction_within_capacity_and_a_mix_of_feasible_rounds(seed):
    p, jobs = random_pool(seed)
    alloc = cooperative(p, jobs=jobs)
    out = alloc.outcome()
    assert out["implementable"] is True and 0 < out["si_fraction"] <= 1
    assert ef_slack(p, alloc.x).min() >= -FAIR_TOL
    u, base = utilities(p, alloc.x), equal_share_values(p)
    assert (u >= out["si_fraction"] * base * (1 - FAIR_TOL)).all()
    if out["si_fraction"] == 1:
        assert si_slack(p, alloc.x).min() >= -FAIR_TOL
    assert (alloc.x.sum(axis=0) <= p.capacity + 1e-6).all() and (alloc.x.sum(axis=1) <= p.caps + 1e-6).all()
    check_schedule(p, alloc)


def test_the_cli_reports_whether_x_is_implementable(tmp_path, capsys):
    f = tmp_path / "jobs.yaml"
    f.write_text("gpus: {a100: 12}\ntenants:\n"
                 "  - {name: t0, throughput: {a100: 1}, jobs: [{id: big, gpus: 8}]}\n"
                 "  - {name: t1, throughput: {a100: 1}, jobs: [{id: big, gpus: 8}]}\n")
    assert allocate_cli.main(["allocate", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["implementable"] is True and math.isclose(out["si_fraction"], 2 / 3, rel_tol=1e-6)
    assert out["allocation"]["t0"]["a100"] == pytest.approx(4, abs=1e-5)
    assert not out["tenants"]["t0"]["sharing_incentive"]     # reported as it is: 4 of the 6 owed


def test_above_the_size_limit_the_result_says_it_is_job_blind(monkeypatch):
    from hetis.allocator import cooperative as coop
    p, jobs = pool({"a100": 12}, [("t0", {"a100": 1.0}, [("big", 8)]), ("t1", {"a100": 1.0}, [("big", 8)])])
    monkeypatch.setattr(coop, "JOBS_MAX_TENANTS", 1)
    alloc = coop.cooperative(p, jobs=jobs)
    assert alloc.outcome()["implementable"] is False and alloc.info["implementable_reason"] == "more than 1 tenants"
    assert np.allclose(alloc.x.ravel(), [6, 6])


def test_schedule_tells_a_reachable_x_from_an_unreachable_one():
    """jobs.schedule: the job-blind [6, 6] of two 8-GPU jobs on 12 GPUs has no mix of
    feasible rounds; [4, 4] has one (each job half the time), and so has every x that
    `implementable` returns."""
    p, jobs = pool({"a100": 12}, [("t0", {"a100": 1.0}, [("big", 8)]), ("t1", {"a100": 1.0}, [("big", 8)])])
    sizes = job_sizes(p, jobs)
    assert schedule(p, sizes, np.array([[6.0], [6.0]])) is None
    mix = schedule(p, sizes, np.array([[4.0], [4.0]]))
    assert mix is not None and sum(w for w, _ in mix) <= 1 + 1e-9
    assert np.allclose(sum(w * a for w, a in mix), [[4.0], [4.0]])
    for _, a in mix:
        assert a.sum() <= 12 and set(np.unique(a)) <= {0.0, 8.0}
    q, qjobs = random_pool(1)
    alloc = cooperative(q, jobs=qjobs)
    qs = job_sizes(q, qjobs)
    got = schedule(q, qs, alloc.x)
    assert got is not None
    assert np.allclose(sum(w * a for w, a in got), alloc.x[sorted(qs)], atol=1e-6)
