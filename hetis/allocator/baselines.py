"""Baselines for side-by-side comparison with OEF (same Problem, same utilities).

- `max_min_perf`: Gavel's max-min fairness with performance: maximise the smallest
  U_i / f_i(e_i) (utility relative to the weighted, capped equal share), then, at that
  level, the efficiency (a tie-break that only helps the baseline);
- `throughput_sum`: maximise sum_i U_i subject to capacity and caps only;
- `equal_split`: the capped equal share, every tenant its best d_i GPUs of e_i;
- `partial_allocation`: Cole-Gkatzelis-Goel's Partial Allocation mechanism
  (strategy-proof): the weighted Nash-welfare allocation x*, each tenant keeping the
  fraction f_i = (prod_{k!=i} U_k(x*)^w_k / prod_{k!=i} U_k(x*_{-i})^w_k)^(1/w_i) of it.
All LPs by HiGHS; the Nash welfare (concave) by tangent cutting planes, also LPs.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from .ceei import NashWelfare
from .lp import block_rows, solve_lp, utility_rows
from .problem import Allocation, Problem, best_within_cap, equal_share_values, merged


def _timed(mode: str, t0: float, x: np.ndarray, **info) -> Allocation:
    return Allocation(mode, x, time.perf_counter() - t0, info)


def equal_split(p: Problem) -> Allocation:
    t0 = time.perf_counter()
    return _timed("equal", t0, best_within_cap(p.speedup, p.caps, p.equal_share))


def throughput_sum(p: Problem) -> Allocation:
    t0 = time.perf_counter()
    rows, rhs = block_rows(p)
    x = solve_lp(-p.speedup.ravel(), rows, rhs, what="throughput-sum LP")
    return _timed("throughput-sum", t0, np.clip(x.reshape(p.n, p.m), 0.0, None))


def max_min_perf(p: Problem, tie_break: bool = True) -> Allocation:
    """Variables (x, t): max t s.t. U_i >= t f_i(e_i); then max sum U at U_i >= t* f_i(e_i).
    ``tie_break=False`` returns the first LP's vertex as is (like Gavel's policy)."""
    t0 = time.perf_counter()
    n, m = p.n, p.m
    base = equal_share_values(p)
    rows, rhs = block_rows(p)
    a = sp.vstack([sp.hstack([rows, sp.csr_matrix((rows.shape[0], 1))]),
                   sp.hstack([-utility_rows(p), sp.csr_matrix(base[:, None])])]).tocsr()
    b = np.concatenate([rhs, np.zeros(n)])
    z = solve_lp(np.concatenate([np.zeros(n * m), [-1.0]]), a, b, what="max-min LP")
    if not tie_break:
        return _timed("max-min", t0, np.clip(z[:-1].reshape(n, m), 0.0, None), level=float(z[-1]))
    level = z[-1] * (1 - 1e-9)
    x = solve_lp(-p.speedup.ravel(), sp.vstack([rows, -utility_rows(p)]).tocsr(),
                 np.concatenate([rhs, -level * base]), what="max-min tie-break LP")
    return _timed("max-min", t0, np.clip(x.reshape(n, m), 0.0, None), level=float(z[-1]))


def partial_allocation(p: Problem, rel_tol: float = 1e-10) -> Allocation:
    """Interchangeable tenants (same speedups and cap per weight) are merged: the Nash
    welfare is symmetric and concave in them, so its optimum gives them equal bundles per
    unit of weight, and x*_{-i} depends only on i's group and weight. So the n + 1
    programs become one per distinct (group, weight), each a re-solve of one model
    (`NashWelfare`) from the full program's cuts. With W_h the groups' weights, U_h their
    utilities in x* and U'_h in x*_{-i} (i of weight w in group g), the exponent is
    sum_{h != g} W_h (log U_h - log U'_h) + (W_g - w)(log U_g/W_g - log U'_g/(W_g - w)).
    ``rel_tol``: each program's gap z_i - log U_i (`NashWelfare.solve`); the fractions
    move by about 4e-7 at 1e-8 (300 tenants x 8 types, 30 % capped)."""
    t0 = time.perf_counter()
    q, group = merged(p)
    nw = NashWelfare(q)
    big = nw.solve(rel_tol=rel_tol)
    logu = np.log(np.maximum((q.speedup * big).sum(axis=1), 1e-300))
    per_weight = np.where(np.isfinite(q.caps), q.caps / q.weights, np.inf)
    fin = np.isfinite(per_weight)
    frac = np.ones(p.n)
    done: dict[tuple[int, float], float] = {}
    for i in range(p.n):
        g, w = int(group[i]), float(p.weights[i])
        if (g, w) not in done:
            rest = q.weights.copy()
            rest[g] = rest[g] - w if rest[g] - w > 1e-12 * rest[g] else 0.0
            if not rest.any():
                done[(g, w)] = 1.0
                continue
            caps = np.full(q.n, np.inf)
            caps[fin] = per_weight[fin] * rest[fin]
            xs = nw.solve(rest, caps, rel_tol=rel_tol, keep_cuts=False)
            logs = np.log(np.maximum((q.speedup * xs).sum(axis=1), 1e-300))
            others = np.arange(q.n) != g
            e = rest[others] @ (logu[others] - logs[others])
            if rest[g] > 0:
                e += rest[g] * (logu[g] - np.log(q.weights[g]) - logs[g] + np.log(rest[g]))
            done[(g, w)] = min(1.0, float(np.exp(e / w)))
        frac[i] = done[(g, w)]
    x = big[group] * (p.weights / q.weights[group])[:, None]
    return _timed("partial-allocation", t0, x * frac[:, None], fractions=frac.tolist(), programs=len(done) + 1)


BASELINES = {"max-min": max_min_perf, "throughput-sum": throughput_sum, "equal": equal_split,
             "partial-allocation": partial_allocation}
