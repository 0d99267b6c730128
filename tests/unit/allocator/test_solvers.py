"""The OEF modes on small instances with known answers, and the merge of interchangeable
tenants (the property sweeps over random instances, tens of seconds:
tests/integration/test_allocator_properties.py)."""
import numpy as np
import pytest
from hypothesis import given, settings

from hetis.allocator.ceei import ceei
from hetis.allocator.cooperative import cooperative, fair_lp
from hetis.allocator.noncooperative import noncooperative
from hetis.allocator.pareto import pareto_improvement
from hetis.allocator.problem import Problem, ef_slack, efficiency, equal_share_values, si_slack, utilities
from tests.helpers.alloc_instances import TOL, assert_feasible, fair, problems


def test_fair_optimum_can_be_pareto_dominated_and_stage_three_fixes_it():
    # docs/allocator.md's example: the SI+EF optimum (15.389) is Pareto dominated; the best
    # SI+EF+PE allocation has efficiency 15.125 (the CEEI 15.111)
    p = Problem(("a", "b", "c"), np.array([1.0, 1.0, 3.0]), ("t0", "t1", "t2"), np.ones(3),
                np.array([[1.0, 5.0, 4.0], [3.0, 2.0, 3.0], [1.0, 4.0, 3.0]]), np.full(3, np.inf))
    lp = cooperative(p, pareto=False)
    assert lp.info["stage"] == "lp" and abs(efficiency(p, lp.x) - 15.388889) < 1e-5
    assert pareto_improvement(p, lp.x)[0] > 0.01
    a = cooperative(p)
    assert a.info["stage"] == "milp" and abs(efficiency(p, a.x) - 15.125) < 1e-6
    assert pareto_improvement(p, a.x)[0] <= 1e-9 and fair(p, a.x)
    np.testing.assert_allclose(utilities(p, a.x), [7.0, 2.625, 5.5], atol=1e-6)
    assert abs(efficiency(p, ceei(p).x) - 15.111111) < 1e-5


def test_a_capped_instance_where_the_fair_optimum_is_only_flagged_not_pareto_efficient():
    # Found by hypothesis (fresh examples). With t1 capped at one GPU the fair optimum has a
    # 9 % Pareto gain, the capped CEEI is not EF, and the MILP finds SI+EF+PE infeasible: the
    # result is flagged rather than fixed. Whether a fair PE allocation exists here is open
    # (docs/allocator.md, "Caps").
    p = Problem(("g0", "g1", "g2", "g3"), np.ones(4), ("t0", "t1", "t2", "t3"),
                np.array([0.5, 1.0, 0.5, 0.5]),
                np.array([[2.0, 1.0, 0, 0], [6.0, 0, 0, 5.0], [2.0, 2.0, 0.25, 0], [1.0, 0, 0, 0]]),
                np.array([np.inf, 1.0, np.inf, np.inf]))
    a = cooperative(p)
    assert_feasible(p, a.x)
    assert fair(p, a.x)
    assert a.info["stage"] == "lp" and a.info["pareto_efficient"] is False  # the flag is honest
    assert pareto_improvement(p, a.x)[0] > 0.05


@pytest.mark.xfail(strict=True, reason="open: SI+EF+PE with caps on this instance (see above)")
def test_capped_instance_gets_a_pareto_efficient_fair_allocation():
    p = Problem(("g0", "g1", "g2", "g3"), np.ones(4), ("t0", "t1", "t2", "t3"),
                np.array([0.5, 1.0, 0.5, 0.5]),
                np.array([[2.0, 1.0, 0, 0], [6.0, 0, 0, 5.0], [2.0, 2.0, 0.25, 0], [1.0, 0, 0, 0]]),
                np.array([np.inf, 1.0, np.inf, np.inf]))
    assert cooperative(p).info.get("pareto_efficient", True)


def test_pareto_lp_detects_an_inefficient_allocation():
    p = Problem(("a", "b"), np.array([1.0, 1.0]), ("t0", "t1"), np.ones(2),
                np.array([[1.0, 3.0], [3.0, 1.0]]), np.full(2, np.inf))
    gain, y = pareto_improvement(p, p.equal_share)
    assert gain > 0.4 and efficiency(p, y) > efficiency(p, p.equal_share)
    assert pareto_improvement(p, cooperative(p).x)[0] <= 1e-9


def test_capped_tenant_values_only_its_best_gpus():
    p = Problem(("fast", "slow"), np.array([2.0, 10.0]), ("capped", "other"), np.ones(2),
                np.array([[4.0, 1.0], [2.0, 1.0]]), np.array([2.0, np.inf]))
    assert equal_share_values(p)[0] == 4.0 + 1.0        # 1 fast + 1 slow of (1 fast, 5 slow)
    x = cooperative(p).x
    assert x[0].sum() <= 2 + 1e-9 and ef_slack(p, x).min() >= -TOL


def test_noncooperative_trades_when_preferences_differ():
    p = Problem(("a", "b"), np.array([2.0, 2.0]), ("t0", "t1"), np.ones(2),
                np.array([[1.0, 3.0], [3.0, 1.0]]), np.full(2, np.inf))
    x = noncooperative(p).x
    np.testing.assert_allclose(x, [[0.0, 2.0], [2.0, 0.0]], atol=1e-12)


def test_problem_rejects_bad_input_naming_the_field():
    import pytest
    with pytest.raises(ValueError, match="weights"):
        Problem(("a",), np.array([1.0]), ("t",), np.array([0.0]), np.array([[1.0]]), np.array([np.inf]))
    with pytest.raises(ValueError, match="throughput"):
        Problem(("a",), np.array([1.0]), ("t",), np.array([1.0]), np.array([[0.0]]), np.array([np.inf]))


@settings(max_examples=40, deadline=None)
@given(problems(max_n=3, max_m=3))
def test_merging_interchangeable_tenants_loses_nothing(p):
    # duplicate every tenant (with a different weight, same cap per weight): merged LP vs full LP
    from dataclasses import replace
    q = replace(p, tenants=p.tenants + tuple(t + "b" for t in p.tenants), weights=np.tile(p.weights, 2) * np.repeat([1, 2], p.n),
                throughput=np.tile(p.throughput, (2, 1)), caps=np.tile(p.caps, 2) * np.repeat([1, 2], p.n))
    merged = cooperative(q, pareto=False)
    assert merged.info["groups"] <= p.n
    full = fair_lp(q, 4)
    assert efficiency(q, merged.x) >= efficiency(q, full.x) * (1 - 1e-7)
    assert si_slack(q, merged.x).min() >= -TOL and ef_slack(q, merged.x).min() >= -TOL
    assert_feasible(q, merged.x)


def _partial_allocation_by_definition(p: Problem) -> np.ndarray:
    """Cole-Gkatzelis-Goel by the book: n + 1 separate Nash-welfare programs."""
    from dataclasses import replace

    from hetis.allocator.ceei import eisenberg_gale
    x = eisenberg_gale(p)
    logu = np.log((p.speedup * x).sum(axis=1))
    frac = np.ones(p.n)
    for i in range(p.n):
        keep = np.arange(p.n) != i
        sub = replace(p, tenants=tuple(np.array(p.tenants)[keep]), weights=p.weights[keep],
                      throughput=p.throughput[keep], caps=p.caps[keep])
        logs = np.log((sub.speedup * eisenberg_gale(sub)).sum(axis=1))
        frac[i] = min(1.0, np.exp(p.weights[keep] @ (logu[keep] - logs) / p.weights[i]))
    return (p.speedup * x).sum(axis=1) * frac


@pytest.mark.parametrize("caps", [False, True])
def test_partial_allocation_with_merged_tenants_matches_the_definition(caps):
    """Interchangeable tenants share one leave-one-out program per (group, weight): the
    utilities are those of the n + 1 separate programs."""
    from hetis.allocator.baselines import partial_allocation
    rng = np.random.default_rng(7)
    profiles = rng.uniform(0.2, 3.0, size=(3, 3))
    tenants = [{"name": f"t{i}", "throughput": dict(zip("abc", profiles[i % 3])), "weight": [1.0, 2.0][i % 2],
                "max_gpus": (2.0 if i % 3 == 0 else None) if caps else None} for i in range(9)]
    p = Problem.build({"a": 3, "b": 4, "c": 5}, tenants)
    a = partial_allocation(p)
    assert a.info["programs"] < p.n + 1            # duplicates merged
    assert_feasible(p, a.x)
    np.testing.assert_allclose(utilities(p, a.x), _partial_allocation_by_definition(p), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(problems(max_n=5, max_m=3))
def test_dropping_the_caps_no_bundle_reaches_changes_nothing(p):
    """cooperative drops caps that no tenant's bundle (per weight) reaches, so those tenants
    merge: the same efficiency as keeping every cap, SI, EF and the caps hold."""
    from hetis.allocator import cooperative as coop
    loose = coop.cooperative(p, pareto=False)
    saved, coop.LOOSE_TRIES = coop.LOOSE_TRIES, 0
    try:
        kept = coop.cooperative(p, pareto=False)
    finally:
        coop.LOOSE_TRIES = saved
    assert "caps_dropped" not in kept.info
    assert efficiency(p, loose.x) == pytest.approx(efficiency(p, kept.x), rel=1e-7)
    assert si_slack(p, loose.x).min() >= -TOL and ef_slack(p, loose.x).min() >= -TOL
    assert_feasible(p, loose.x)


def test_a_cap_a_bundle_reaches_is_kept(monkeypatch):
    """t0 alone values the 20 a100; its cap of 10 is above the first threshold (2.5 x the
    pool per weight, 3), so it is dropped first, its bundle reaches 20, and the retry keeps it."""
    from hetis.allocator import cooperative as coop
    tried = []
    solve = coop._solve
    monkeypatch.setattr(coop, "_solve", lambda q, *a: tried.append(q.caps[0]) or solve(q, *a))
    tenants = [{"name": "t0", "throughput": {"a100": 1.0, "t4": 0.0}, "max_gpus": 10.0}]
    tenants += [{"name": f"t{i}", "throughput": {"a100": 0.0, "t4": 1.0}} for i in range(1, 10)]
    p = Problem.build({"a100": 20, "t4": 10}, tenants)
    alloc = coop.cooperative(p, pareto=False)
    assert tried == [np.inf, 10.0] and "caps_dropped" not in alloc.info
    assert alloc.x[0, 0] == pytest.approx(10.0, abs=1e-6) and alloc.x[0].sum() <= 10 + 1e-9
