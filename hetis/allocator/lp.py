"""What the solvers share: tolerances, the constraint blocks over x, the EF rows at a
fixed cap price, one HiGHS call, and a guard for HiGHS's stray stdout.

x is flattened tenant-major (column i*m + j). `block_rows` are the capacity and
demand-cap rows every LP starts from; `utility_rows` @ x = U. EF against a capped
valuation is not convex, so a pair (i, k) is enforced through the linear bound
d_i lam + sum_j a_j (s_ij - lam)^+ >= f_i(a) at a fixed lam (`ef_cut_rows`), tight
at the cap's dual price (`cut_prices`). Stage 1 (cooperative.py) adds these rows
lazily, a tenant's few most violated pairs at a time (`ef_violations`); so does the
LP over the CEEI's face (pareto.py), all violated pairs at a time.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from .problem import Problem, capped_price

TOL = 1e-9  # relative tolerance of the LPs and of the cut generation
CUTS_PER_TENANT = 3  # EF rows added per tenant and LP round
HIGHS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
PE_TOL = 1e-9  # stage 2: a relative Pareto gain up to this counts as none
ACCEPT_TOL = 1e-7  # stage 3: SI/EF slack and Pareto gain a candidate must meet (relative)
MILP_TIME_LIMIT = 10.0  # seconds for stage 3's MILPs together
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
    q = np.clip(s[:, None, :] - lam[:, :, None], 0.0, None)          # (n, n, m)
    bound = np.where(lam > 0, finite(p.caps)[:, None] * lam, 0.0) + (
        p.weights[:, None] / p.weights[None, :]) * np.einsum("ikm,km->ik", q, x)
    v = (bound - (s * x).sum(axis=1)[:, None]) / scale[:, None]
    np.fill_diagonal(v, -np.inf)
    return v


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
