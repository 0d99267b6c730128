"""Strategy-proofness: a search over misreports per tenant (scaled, permuted, extreme,
exaggerated, random profiles) finds no profitable lie against `noncooperative`, and
finds profitable lies against `cooperative` (so the search has teeth)."""
import itertools
from dataclasses import replace

import numpy as np
from alloc_instances import problems
from hypothesis import given, settings

from services.allocator import oef


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


def best_gain(p: oef.Problem, mechanism, rng) -> float:
    """The largest relative gain in true utility any tenant gets from a misreport."""
    truth = oef.utilities(p, mechanism(p).x)
    base = oef.equal_share_values(p)
    best = -np.inf
    for i in range(p.n):
        for lie in misreports(p.speedup[i], rng):
            thr = p.throughput.copy()
            thr[i] = lie
            x = mechanism(replace(p, throughput=thr)).x
            true_u = oef.capped_value(p.speedup[i], p.caps[i], x[i])   # judged by the true profile
            best = max(best, (true_u - truth[i]) / base[i])
    return best


@settings(max_examples=150, deadline=None)
@given(problems(max_n=4, min_m=2, max_m=3))
def test_noncooperative_has_no_profitable_misreport(p):
    assert best_gain(p, oef.noncooperative, np.random.default_rng(0)) <= 1e-6


def test_noncooperative_with_public_prices_has_no_profitable_misreport():
    rng = np.random.default_rng(1)
    for _ in range(5):
        n, m = 4, 3
        p = oef.Problem(("a", "b", "c"), rng.integers(2, 10, m).astype(float), tuple(f"t{i}" for i in range(n)),
                        rng.choice([1.0, 2.0], n), rng.uniform(0.1, 10, (n, m)), np.full(n, np.inf),
                        prices=np.array([4.9, 3.3, 1.0]))
        assert oef.noncooperative(p).info["prices"] == [4.9, 3.3, 1.0]
        assert best_gain(p, oef.noncooperative, rng) <= 1e-6


def test_the_same_search_finds_profitable_lies_against_cooperative():
    rng = np.random.default_rng(2)
    gains = []
    for _ in range(3):    # each a few seconds: misreports often need cooperative's stage 3
        n, m = 4, 3
        p = oef.Problem(("a", "b", "c"), rng.integers(2, 10, m).astype(float), tuple(f"t{i}" for i in range(n)),
                        np.ones(n), rng.uniform(0.1, 10, (n, m)), np.full(n, np.inf))
        gains.append(best_gain(p, oef.cooperative, rng))
    assert max(gains) > 1e-3, gains
    assert sum(g > 1e-6 for g in gains) >= 2, gains
