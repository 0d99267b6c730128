"""Strategy-proofness: a search over misreports per tenant (scaled, permuted, extreme,
exaggerated, random profiles) finds no profitable lie against `noncooperative`, and
finds profitable lies against `cooperative` (so the search has teeth). Thousands of
solves: tens of seconds in all."""
import itertools
from dataclasses import replace

import numpy as np
from hypothesis import given, settings

from hetis.allocator.cooperative import cooperative
from hetis.allocator.noncooperative import noncooperative
from hetis.allocator.problem import Problem, capped_value, equal_share_values, utilities
from tests.helpers.alloc_instances import problems


def misreports(s: np.ndarray, rng: np.random.Generator, n_random: int = 12) -> list[np.ndarray]:
    m = len(s)
    out = [s * 3.0, s * 0.1, s ** 2 + 1e-3, np.sqrt(s) + 1e-3]
    out += [s[list(perm)] + 1e-3 for perm in itertools.islice(itertools.permutations(range(m)), 1, 24)]
    for j in range(m):
        spike = np.full(m, 1e-3)
        spike[j] = 100.0
        out += [spike, np.where(np.arange(m) == j, s[j] * 10, s)]
    out += [rng.uniform(0.01, 10.0, m) for _ in range(n_random)]
    return out


def best_gain(p: Problem, mechanism, rng) -> float:
    """The largest relative gain in true utility any tenant gets from a misreport."""
    truth = utilities(p, mechanism(p).x)
    base = equal_share_values(p)
    best = -np.inf
    for i in range(p.n):
        for lie in misreports(p.speedup[i], rng):
            thr = p.throughput.copy()
            thr[i] = lie
            x = mechanism(replace(p, throughput=thr)).x
            true_u = capped_value(p.speedup[i], p.caps[i], x[i])   # judged by the true profile
            best = max(best, (true_u - truth[i]) / base[i])
    return best


@settings(max_examples=150, deadline=None)
@given(problems(max_n=4, min_m=2, max_m=3))
def test_noncooperative_has_no_profitable_misreport(p):
    assert best_gain(p, noncooperative, np.random.default_rng(0)) <= 1e-6


def test_noncooperative_with_public_prices_has_no_profitable_misreport():
    rng = np.random.default_rng(1)
    for _ in range(5):
        n, m = 4, 3
        p = Problem(("a", "b", "c"), rng.integers(2, 10, m).astype(float), tuple(f"t{i}" for i in range(n)),
                    rng.choice([1.0, 2.0], n), rng.uniform(0.1, 10, (n, m)), np.full(n, np.inf),
                    prices=np.array([4.9, 3.3, 1.0]))
        assert noncooperative(p).info["prices"] == [4.9, 3.3, 1.0]
        assert best_gain(p, noncooperative, rng) <= 1e-6


def test_the_same_search_finds_profitable_lies_against_cooperative():
    rng = np.random.default_rng(2)
    gains = []
    for _ in range(3):    # each a few seconds: misreports often need cooperative's stage 3
        n, m = 4, 3
        p = Problem(("a", "b", "c"), rng.integers(2, 10, m).astype(float), tuple(f"t{i}" for i in range(n)),
                    np.ones(n), rng.uniform(0.1, 10, (n, m)), np.full(n, np.inf))
        gains.append(best_gain(p, cooperative, rng))
    assert max(gains) > 1e-3, gains
    assert sum(g > 1e-6 for g in gains) >= 2, gains
