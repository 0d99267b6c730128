"""Property sweeps of the OEF modes and the baselines on random instances (hypothesis,
40 to 250 instances a test, each through the real solvers: tens of seconds in all; the
worked examples are in tests/unit/allocator/test_solvers.py)."""
from hypothesis import given, settings

from hetis.allocator.baselines import BASELINES
from hetis.allocator.ceei import ceei
from hetis.allocator.cooperative import cooperative
from hetis.allocator.noncooperative import noncooperative
from hetis.allocator.pareto import pareto_improvement
from hetis.allocator.problem import ef_slack, efficiency, si_slack
from tests.helpers.alloc_instances import TOL, assert_feasible, fair, problems


@settings(max_examples=150, deadline=None)
@given(problems())
def test_both_oef_modes_are_feasible_si_and_ef(p):
    for mode in (lambda q: cooperative(q, time_limit=60), noncooperative):
        x = mode(p).x
        assert_feasible(p, x)
        assert si_slack(p, x).min() >= -TOL
        assert ef_slack(p, x).min() >= -TOL


def candidates(p):
    """Every baseline, the FPX exchange and the CEEI (PE, SI and EF without caps)."""
    return {**BASELINES, "noncooperative": noncooperative, "ceei": ceei}


@settings(max_examples=250, deadline=None)
@given(problems(max_n=5))
def test_cooperative_is_pareto_efficient(p):
    # the real property: an LP finds no allocation making a tenant better off and none worse off
    a = cooperative(p)
    assert a.info["stage"] in ("lp", "milp", "ceei") and a.info.get("pareto_efficient", True)
    gain, _ = pareto_improvement(p, a.x)
    assert gain <= 1e-7, a.info
    assert_feasible(p, a.x)
    assert fair(p, a.x), a.info


@settings(max_examples=40, deadline=None)
@given(problems(max_n=4, max_m=3))
def test_cooperative_is_at_least_as_efficient_as_every_fair_and_pareto_efficient_baseline(p):
    # partial allocation scales bundles down, so it is never Pareto efficient: left out
    best = efficiency(p, cooperative(p, time_limit=60).x)
    for name, f in candidates(p).items():
        if name == "partial-allocation":
            continue
        x = f(p).x
        assert_feasible(p, x)
        if fair(p, x) and pareto_improvement(p, x)[0] <= 1e-9:
            assert best >= efficiency(p, x) * (1 - 1e-7), name


@settings(max_examples=40, deadline=None)
@given(problems(max_n=4, max_m=3))
def test_fair_optimum_is_at_least_as_efficient_as_every_fair_baseline(p):
    # stage 1 alone (pareto=False): max efficiency s.t. SI and EF, Pareto efficient or not
    best = efficiency(p, cooperative(p, pareto=False, time_limit=60).x)
    n_fair = 0
    for name, f in candidates(p).items():
        x = f(p).x
        if fair(p, x):
            n_fair += 1
            assert best >= efficiency(p, x) * (1 - 1e-7), name
    assert n_fair >= 2  # equal split and noncooperative always qualify


@settings(max_examples=40, deadline=None)
@given(problems(caps=False))
def test_ceei_is_pareto_efficient_sharing_incentive_and_envy_free_without_caps(p):
    x = ceei(p).x
    assert_feasible(p, x)
    assert fair(p, x) and pareto_improvement(p, x)[0] <= 1e-9
