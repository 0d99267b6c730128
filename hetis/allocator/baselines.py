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
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from .ceei import eisenberg_gale as nash_welfare
from .lp import block_rows, solve_lp, utility_rows
from .problem import Allocation, Problem, best_within_cap, equal_share_values


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


def partial_allocation(p: Problem) -> Allocation:
    t0 = time.perf_counter()
    x = nash_welfare(p)
    logu = np.log(np.maximum((p.speedup * x).sum(axis=1), 1e-300))
    frac = np.ones(p.n)
    for i in range(p.n):
        keep = np.arange(p.n) != i
        if not keep.any():
            break
        sub = replace(p, tenants=tuple(np.array(p.tenants)[keep]), weights=p.weights[keep],
                      throughput=p.throughput[keep], caps=p.caps[keep])
        xs = nash_welfare(sub)
        logu_s = np.log(np.maximum((sub.speedup * xs).sum(axis=1), 1e-300))
        frac[i] = min(1.0, np.exp((p.weights[keep] @ (logu[keep] - logu_s)) / p.weights[i]))
    return _timed("partial-allocation", t0, x * frac[:, None], fractions=frac.tolist())


BASELINES = {"max-min": max_min_perf, "throughput-sum": throughput_sum, "equal": equal_split,
             "partial-allocation": partial_allocation}
