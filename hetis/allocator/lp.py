"""What the solvers share: tolerances, the constraint blocks over x, the EF rows at a
fixed cap price, one HiGHS call, a HiGHS model kept across re-solves (`LP`), and a
guard for HiGHS's stray stdout.

x is flattened tenant-major (column i*m + j). `block_rows` are the capacity and
demand-cap rows every LP starts from; `utility_rows` @ x = U. EF against a capped
valuation is not convex, so a pair (i, k) is enforced through the linear bound
d_i lam + sum_j a_j (s_ij - lam)^+ >= f_i(a) at a fixed lam (`ef_cut_rows`), tight
at the cap's dual price (`cut_prices`). Stage 1 (cooperative.py) adds these rows
lazily, a tenant's few most violated pairs at a time (`ef_violations`), into one
`LP` that keeps its basis, so each re-solve is a few dual simplex pivots; so does the
LP over the CEEI's face (pareto.py), all violated pairs at a time.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading
import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

# HiGHS' own Python bindings (highspy, the solver scipy's linprog wraps): a model that
# keeps its basis when rows are added or deleted, which linprog cannot do
import highspy

from .problem import Problem, capped_price

TOL = 1e-9  # relative tolerance of the LPs and of the cut generation
CUTS_PER_TENANT = 3  # EF rows added per tenant and LP round
HIGHS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
PE_TOL = 1e-9  # stage 2: a relative Pareto gain up to this counts as none
ACCEPT_TOL = 1e-7  # stage 3: SI/EF slack and Pareto gain a candidate must meet (relative)
MILP_TIME_LIMIT = 10.0  # seconds for stage 3's MILPs together (within the time budget)
TIME_BUDGET = 2.0  # seconds for a whole `cooperative` call unless told otherwise
WEIGHT_RATIO = 64.0  # stage 3: supporting welfare weights range over [1, max(WEIGHT_RATIO, 2 R_ceei)]


def finite(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, 0.0)


def block_rows(p: Problem) -> tuple[sp.csr_matrix, np.ndarray]:
    """Capacity (sum_i x_ij <= c_j) and demand caps (sum_j x_ij <= d_i) over x flattened i*m+j."""
    n, m = p.n, p.m
    cap_rows = sp.kron(np.ones((1, n)), sp.eye(m))
    capped = np.flatnonzero(np.isfinite(p.caps))
    dem_rows = sp.kron(sp.eye(n).tocsr()[capped], np.ones((1, m)))
    return sp.vstack([cap_rows, dem_rows]).tocsr(), np.concatenate([p.capacity, p.caps[capped]])


def utility_rows(p: Problem) -> sp.csr_matrix:
    """(n, n*m): row i is s_i on block i, so rows @ x = U."""
    return sp.block_diag([row[None, :] for row in p.speedup]).tocsr() if p.n else sp.csr_matrix((0, 0))


def solve_lp(c: np.ndarray, a_ub, b_ub: np.ndarray, bounds=(0, None), what: str = "LP") -> np.ndarray:
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs", options=HIGHS)
    if res.status != 0:
        raise RuntimeError(f"{what}: HiGHS status {res.status}: {res.message}")
    return res.x


class LP:
    """min c.x s.t. A x <= b, x >= lower (default 0), as one HiGHS model that rows are
    added to and deleted from; each `solve` starts from the previous basis (dual simplex)."""

    def __init__(self, c: np.ndarray, a: sp.csr_matrix, b: np.ndarray, lower: np.ndarray | None = None):
        self.h = _highs()
        for k, v in (("output_flag", False), ("presolve", "off"), *HIGHS.items()):
            self.h.setOptionValue(k, v)
        n = len(c)
        lo = np.zeros(n) if lower is None else np.where(np.isfinite(lower), lower, -highspy.kHighsInf)
        self.h.addVars(n, lo.astype(float), np.full(n, highspy.kHighsInf))
        self.set_cost(c)
        self.rows = 0
        self.add(a, b)

    def add(self, a: sp.csr_matrix, b: np.ndarray, lower: np.ndarray | None = None) -> None:
        """Rows lower <= a x <= b (lower -inf unless given: ``lower=b`` is an equality)."""
        a = sp.csr_matrix(a)
        if a.shape[0]:
            lo = np.full(a.shape[0], -highspy.kHighsInf) if lower is None else np.asarray(lower, dtype=float)
            self.h.addRows(a.shape[0], lo, np.asarray(b, dtype=float), a.nnz,
                           a.indptr.astype(np.int32), a.indices.astype(np.int32), a.data.astype(float))
            self.rows += a.shape[0]

    def add_cols(self, cost: np.ndarray, a: sp.csc_matrix) -> None:
        """Columns >= 0 with entries ``a`` (rows x new columns) in the rows there are."""
        a = sp.csc_matrix(a)
        k = a.shape[1]
        if k:
            self.h.addCols(k, np.asarray(cost, dtype=float), np.zeros(k), np.full(k, highspy.kHighsInf), a.nnz,
                           a.indptr.astype(np.int32), a.indices.astype(np.int32), a.data.astype(float))

    @property
    def cols(self) -> int:
        return int(self.h.getNumCol())

    def set_cost(self, c: np.ndarray) -> None:
        self.h.changeColsCost(len(c), np.arange(len(c), dtype=np.int32), np.asarray(c, dtype=float))

    def set_bounds(self, col: int, lower: float, upper: float) -> None:
        self.h.changeColBounds(col, float(lower), float(upper))

    def row_duals(self) -> np.ndarray:
        return np.asarray(self.h.getSolution().row_dual)

    def delete(self, rows: np.ndarray) -> None:
        if len(rows):
            self.h.deleteRows(len(rows), np.asarray(rows, dtype=np.int32))
            self.rows -= len(rows)

    def solve(self, deadline: float = math.inf) -> np.ndarray | None:
        """The optimal x, or None if the deadline came first; RuntimeError if infeasible."""
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        # HiGHS's clock runs across calls: the limit is on its total run time
        self.h.setOptionValue("time_limit", float(self.h.getRunTime() + min(left, 1e6)))
        self.h.run()
        status = self.h.getModelStatus()
        if status == highspy.HighsModelStatus.kUnknown:   # numerical trouble from the warm basis: once cold
            self.h.clearSolver()
            self.h.run()
            status = self.h.getModelStatus()
        if status == highspy.HighsModelStatus.kTimeLimit:
            return None
        if status != highspy.HighsModelStatus.kOptimal:
            raise RuntimeError(f"LP: HiGHS status {self.h.modelStatusToString(status)}")
        return np.asarray(self.h.getSolution().col_value)

    @property
    def objective(self) -> float:
        return float(self.h.getInfo().objective_function_value)

    def row_values(self) -> np.ndarray:
        return np.asarray(self.h.getSolution().row_value)


_BANNER_SHOWN = False


def _highs() -> "highspy.Highs":
    """A new HiGHS model. highspy >= 1.12 prints its banner to stdout when the first one
    of a process is made (before output_flag can be set): that one is made with stdout
    sent to stderr, so `hetis allocate --json` prints only JSON."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return highspy.Highs()
    with stdout_to_stderr():
        h = highspy.Highs()
    _BANNER_SHOWN = True
    return h


# ---------------------------------------------------------------- EF rows at a fixed cap price

def ef_cut_rows(p: Problem, pairs: np.ndarray, lam: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """EF cuts -s_i.x_i + (w_i/w_k) (s_i - lam_ik)^+ . x_k <= -d_i lam_ik for pairs (i, k)."""
    n, m, s = p.n, p.m, p.speedup
    i, k = pairs[:, 0], pairs[:, 1]
    lk = lam[i, k]
    q = np.clip(s[i] - lk[:, None], 0.0, None) * (p.weights[i] / p.weights[k])[:, None]
    r = np.repeat(np.arange(len(pairs)), 2 * m)
    cols = np.concatenate([i[:, None] * m + np.arange(m), k[:, None] * m + np.arange(m)], axis=1).ravel()
    vals = np.concatenate([-s[i], q], axis=1).ravel()
    rhs = -np.where(lk > 0, finite(p.caps)[i] * lk, 0.0)
    return sp.csr_matrix((vals, (r, cols)), shape=(len(pairs), n * m)), rhs


def ef_violations(p: Problem, x: np.ndarray, lam: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Relative violation of every pair's (linear, lam-priced) EF condition, (n, n)."""
    s = p.speedup
    per_weight = x / p.weights[:, None]
    bound = p.weights[:, None] * (s @ per_weight.T)      # lam = 0: one (n, m) @ (m, n) product
    rows = np.flatnonzero(lam.any(axis=1))                # capped tenants priced above 0
    if len(rows):
        q = np.clip(s[rows, None, :] - lam[rows, :, None], 0.0, None)          # (r, n, m)
        bound[rows] = np.where(lam[rows] > 0, finite(p.caps)[rows, None] * lam[rows], 0.0) + \
            p.weights[rows, None] * np.einsum("ikm,km->ik", q, per_weight)
    v = (bound - (s * x).sum(axis=1)[:, None]) / scale[:, None]
    np.fill_diagonal(v, -np.inf)
    return v


def violated_pairs(viol: np.ndarray) -> np.ndarray:
    """EF pairs (i, k) to add as rows: per envious tenant its CUTS_PER_TENANT most violated
    (most pairs never bind), those violated beyond the tolerance; ``viol`` from `ef_violations`."""
    n = len(viol)
    k = min(CUTS_PER_TENANT, n - 1)
    if k <= 0:
        return np.zeros((0, 2), dtype=int)
    worst = np.argpartition(-viol, k - 1, axis=1)[:, :k]
    new = np.stack([np.repeat(np.arange(n), k), worst.ravel()], axis=1)
    return new[viol[new[:, 0], new[:, 1]] > TOL * 10]


def cut_prices(p: Problem, x: np.ndarray) -> np.ndarray:
    """lam[i, k]: the cap's dual price in f_i(w_i/w_k x_k), so each EF cut is tight at x."""
    n, s = p.n, p.speedup
    scaled = (p.weights[:, None, None] / p.weights[None, :, None]) * x[None, :, :]
    lam = capped_price(np.broadcast_to(s[:, None, :], scaled.shape), np.broadcast_to(p.caps[:, None], (n, n)),
                       scaled)
    return np.where(np.isfinite(p.caps)[:, None], lam, 0.0)


# ---------------------------------------------------------------- HiGHS's stdout

_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def stdout_to_stderr():
    """HiGHS's MIP solver sometimes printf()s a debug line to stdout (HiGHS issue
    #2783) even with output off; `hetis allocate --json` must print only JSON there."""
    with _STDOUT_LOCK:
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError, AttributeError):
            yield
            return
        try:
            os.dup2(2, 1)
            yield
        finally:
            try:
                ctypes.CDLL(None).fflush(None)
            except (OSError, AttributeError):
                pass
            os.dup2(saved, 1)
            os.close(saved)
