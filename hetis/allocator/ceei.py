"""The weighted CEEI (competitive equilibrium from equal incomes): `cooperative`'s
fall-back in stage 3, and the Nash-welfare solver of partial allocation (baselines.py).

Eisenberg-Gale, max sum_i w_i log U_i over capacity and caps, is concave: it is
solved by tangent cutting planes on log, each step a HiGHS LP, and then (without
caps) made exact by one LP on the equilibrium's maximum-bang-per-buck edges. PE, SI
and EF for linear utilities (Varian 1974); with caps it is neither an equilibrium
nor always fair, which is why pareto.py verifies it before use.
"""
from __future__ import annotations

import math
import time

import highspy
import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from .lp import HIGHS, LP, block_rows, utility_rows
from .problem import Allocation, Problem, equal_share_values


class NashWelfare:
    """argmax sum_i w_i log U_i over capacity and caps (Eisenberg-Gale), by tangent cuts
    z_i <= log u + (U_i - u)/u of log at the current utilities, each step a re-solve of
    one HiGHS model (`LP`). The cuts bound log whatever the weights, so the model can be
    re-solved for other weights and caps of the same tenants (`solve`), a weight of 0
    leaving the tenant out: partial allocation's leave-one-out programs share it, each
    starting from the first one's cuts (those it adds are deleted after it).

    Every LP maximises sum_i w_i min_cuts(...), a strictly increasing function of U, so
    its solution is Pareto efficient whatever the remaining gap; the gap (z_i - log U_i
    <= rel_tol) only bounds how far it is from the exact CEEI (SI, EF)."""

    def __init__(self, p: Problem):
        self.p = p
        n, m = p.n, p.m
        rows, rhs = block_rows(p)
        self.ur = utility_rows(p)
        self.capped = np.flatnonzero(np.isfinite(p.caps))
        self.lp = LP(np.concatenate([np.zeros(n * m), -p.weights]), sp.hstack([rows, sp.csr_matrix((rows.shape[0], n))]),
                     rhs, lower=np.concatenate([np.zeros(n * m), np.full(n, -np.inf)]))
        base = np.maximum(equal_share_values(p), 1e-12)
        for f in (0.25, 0.5, 1.0, 2.0, 4.0, 16.0):
            self.lp.add(*self._tangents(base * f))
        self.weights = p.weights.copy()

    def _tangents(self, u0: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:   # z_i - U_i/u0 <= log u0 - 1
        n = self.p.n
        return sp.hstack([-sp.diags(1 / u0) @ self.ur, sp.eye(n)]).tocsr(), np.log(u0) - 1

    def solve(self, weights: np.ndarray | None = None, caps: np.ndarray | None = None, rel_tol: float = 1e-10,
              max_iter: int = 200, deadline: float = math.inf, keep_cuts: bool = True) -> np.ndarray:
        """x for ``weights`` (default the problem's; 0 = left out, x_i = 0) and demand
        ``caps`` of the capped tenants (default the problem's). At ``deadline`` the last
        iterate (Pareto efficient, not exactly SI or EF). ``keep_cuts`` False: the cuts
        this solve adds are deleted after it."""
        p, lp, h = self.p, self.lp, self.lp.h
        n, m = p.n, p.m
        w = p.weights if weights is None else np.asarray(weights, dtype=float)
        if not np.array_equal(w, self.weights):
            h.changeColsCost(n, (n * m + np.arange(n)).astype(np.int32), -w)
            cols = np.arange(n * m, dtype=np.int32)
            h.changeColsBounds(n * m, cols, np.zeros(n * m), np.where(np.repeat(w, m) > 0, highspy.kHighsInf, 0.0))
            self.weights = w.copy()
        if len(self.capped):
            d = p.caps[self.capped] if caps is None else np.asarray(caps, dtype=float)[self.capped]
            idx = (m + np.arange(len(self.capped))).astype(np.int32)
            h.changeRowsBounds(len(idx), idx, np.full(len(idx), -highspy.kHighsInf), d)
        rows0 = lp.rows
        live = w > 0
        x = np.zeros((n, m))
        try:
            for _ in range(max_iter):
                z = lp.solve(deadline)
                if z is None:
                    return x
                x = np.clip(z[:n * m].reshape(n, m), 0.0, None)
                u = np.maximum((p.speedup * x).sum(axis=1), 1e-300)
                gap = np.where(live, z[n * m:] - np.log(u), 0.0)
                if np.all(gap <= rel_tol) or time.perf_counter() > deadline:
                    return x
                cut, rhs = self._tangents(np.where(live, u, 1.0))
                far = np.flatnonzero(gap > rel_tol)          # tenants whose log is already met need none
                lp.add(cut[far], rhs[far])
            return x
        finally:
            if not keep_cuts and lp.rows > rows0:
                lp.delete(np.arange(rows0, lp.rows))


def eisenberg_gale(p: Problem, rel_tol: float = 1e-10, max_iter: int = 200,
                   deadline: float = math.inf) -> np.ndarray:
    """argmax sum_i w_i log U_i over capacity and caps (`NashWelfare`, one solve)."""
    return NashWelfare(p).solve(rel_tol=rel_tol, max_iter=max_iter, deadline=deadline)


def ceei(p: Problem, deadline: float = math.inf) -> Allocation:
    """The weighted competitive equilibrium from equal incomes: the Eisenberg-Gale
    allocation, x_ij = 0 where s_ij = 0 (useless GPUs only feed others' envy). PE, SI and
    EF for linear utilities (Varian 1974); `cooperative`'s last resort."""
    t0 = time.perf_counter()
    x = eisenberg_gale(p, deadline=deadline)
    x = np.where(p.speedup > 0, x, 0.0)
    polished = False
    if not np.isfinite(p.caps).any():
        for tol in (1e-4, 1e-6):
            y = _ceei_polish(p, x, tol)
            if y is not None:
                x, polished = y, True
                break
    return Allocation("ceei", x, time.perf_counter() - t0, {"polished": polished})


def _ceei_polish(p: Problem, x: np.ndarray, tol: float) -> np.ndarray | None:
    """Exact equilibrium (no caps) on the approximate one's maximum-bang-per-buck edges:
    money flows b_ij >= 0 on edges E (s_ij/p_j within tol of i's best ratio at the
    approximate prices), prices p and weights beta with sum_j b_ij = w_i,
    sum_i b_ij = p_j c_j, beta_i s_ij <= p_j, equal on E: one LP. x_ij = b_ij / p_j."""
    n, m, s = p.n, p.m, p.speedup
    u = np.maximum((s * x).sum(axis=1), 1e-300)
    beta0 = p.weights / u
    price0 = (beta0[:, None] * s).max(axis=0)
    edges = np.argwhere((beta0[:, None] * s >= price0[None, :] * (1 - tol)) & (s > 0))
    ne = len(edges)
    ei, ej = edges[:, 0], edges[:, 1]
    # variables: b (ne), p (m), beta (n)
    nv = ne + m + n
    er = np.arange(ne)
    spend = sp.csr_matrix((np.ones(ne), (ei, er)), shape=(n, nv))
    sold = sp.csr_matrix((np.concatenate([np.ones(ne), -p.capacity]),
                          (np.concatenate([ej, np.arange(m)]), np.concatenate([er, ne + np.arange(m)]))),
                         shape=(m, nv))
    tight = sp.csr_matrix((np.concatenate([s[ei, ej], -np.ones(ne)]),
                           (np.concatenate([er, er]), np.concatenate([ne + m + ei, ne + ej]))), shape=(ne, nv))
    ii, jj = np.divmod(np.arange(n * m), m)
    feas = sp.csr_matrix((np.concatenate([s.ravel(), -np.ones(n * m)]),
                          (np.tile(np.arange(n * m), 2), np.concatenate([ne + m + ii, ne + jj]))), shape=(n * m, nv))
    res = linprog(np.zeros(nv), A_ub=feas, b_ub=np.zeros(n * m), A_eq=sp.vstack([spend, sold, tight]).tocsr(),
                  b_eq=np.concatenate([p.weights, np.zeros(m + ne)]), bounds=(0, None), method="highs",
                  options=HIGHS)
    if res.status != 0:
        return None
    b, price = res.x[:ne], res.x[ne:ne + m]
    out = np.zeros((n, m))
    ok = price[ej] > 0
    out[ei[ok], ej[ok]] = b[ok] / price[ej[ok]]
    return out
