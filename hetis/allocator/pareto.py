"""Stages 2 and 3 of `cooperative`: is the fair optimum Pareto efficient, and if not,
the most efficient allocation that is SI, EF and Pareto efficient (PE).

Stage 2 is one LP (`pareto_improvement`): the largest total gain an allocation can
give without making any tenant worse off; 0 iff x is PE. Stage 3 computes the CEEI
(ceei.py: PE, and SI+EF without caps), the best point of its supporting face
(`_best_on_face`) and the MILP over SI, EF and PE (milp.py), bounded below by the
fall-back; it returns the MILP's answer, else the fall-back. Every candidate is
re-verified (`check_fair_pe`) first. Why PE can cost efficiency, and the measured
cost: docs/allocator.md.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from .ceei import ceei
from .lp import (
    ACCEPT_TOL,
    HIGHS,
    MILP_TIME_LIMIT,
    PE_TOL,
    TOL,
    WEIGHT_RATIO,
    block_rows,
    cut_prices,
    ef_cut_rows,
    ef_violations,
    solve_lp,
    utility_rows,
)
from .milp import pe_milp
from .problem import (
    Problem,
    ef_pairs_tight,
    ef_slack,
    efficiency,
    equal_share_values,
    si_slack,
    utilities,
)

MIN_STAGE_SECONDS = 0.05  # less left than this: a stage is not started


def pareto_improvement(p: Problem, x: np.ndarray) -> tuple[float, np.ndarray]:
    """max sum_i t_i over allocations y with U_i(y) >= U_i(x) + t_i, t >= 0 (an LP).
    Returns (the gain relative to efficiency(x), y): the gain is 0 iff x is Pareto efficient."""
    n, m = p.n, p.m
    u = utilities(p, x)
    rows, rhs = block_rows(p)
    rows = sp.hstack([rows, sp.csr_matrix((rows.shape[0], n))])
    improve = sp.hstack([-utility_rows(p), sp.eye(n)])      # -U_i(y) + t_i <= -U_i(x)
    c = np.concatenate([np.zeros(n * m), -np.ones(n)])
    # U_i(x) less a hair (1e-12 of the largest utility): x itself may exceed a capacity
    # by the LP tolerance, which must not make "no worse off" infeasible
    slack = 1e-12 * max(float(u.max(initial=0.0)), 1e-12)
    z = solve_lp(c, sp.vstack([rows, improve]).tocsr(), np.concatenate([rhs, -u + slack]), what="Pareto LP")
    return float(z[n * m:].sum() / max(u.sum(), 1e-12)), np.clip(z[:n * m].reshape(n, m), 0.0, None)


def check_fair_pe(p: Problem, x: np.ndarray) -> tuple[float, float, float]:
    """(min SI slack, min EF slack, relative Pareto gain): the verification of stage 3."""
    return float(si_slack(p, x).min()), float(ef_slack(p, x).min()), pareto_improvement(p, x)[0]


def _acceptable(check: tuple[float, float, float]) -> bool:
    si, ef, gain = check
    return si >= -ACCEPT_TOL and ef >= -ACCEPT_TOL and gain <= ACCEPT_TOL


def pareto_stages(p: Problem, x: np.ndarray, cuts: np.ndarray, deadline: float) -> tuple[np.ndarray, dict]:
    """Stages 2 and 3 of `cooperative` on distinct tenants, until ``deadline``
    (perf_counter seconds); stage 3's MILPs get at most MILP_TIME_LIMIT of it. Without
    time for the Pareto LP, ``pareto_efficient`` is None (not checked); without time for
    stage 3, x* comes back with ``pareto_efficient`` False."""
    t0 = time.perf_counter()
    if deadline - t0 < MIN_STAGE_SECONDS:
        return x, {"pareto_efficient": None}
    gain, _ = pareto_improvement(p, x)
    info: dict = {"pareto_gain_lp": gain}
    if gain <= PE_TOL:
        return x, info
    if deadline - time.perf_counter() < MIN_STAGE_SECONDS:
        info["pareto_efficient"] = gain <= ACCEPT_TOL
        return x, info
    ce = ceei(p, deadline).x
    ce_check = check_fair_pe(p, ce)
    ce_ok = _acceptable(ce_check)
    info["ceei_check"] = list(ce_check)
    u = np.maximum(utilities(p, ce), 1e-300)
    ratio = float((p.weights / u).max() / (p.weights / u).min())
    # start from stage 1's EF pairs and the pairs tight at the CEEI
    pairs = np.unique(np.concatenate([cuts.reshape(-1, 2), ef_pairs_tight(p, ce)]), axis=0)
    if ce_ok and deadline - time.perf_counter() > MIN_STAGE_SECONDS:
        # the best point of the CEEI's supporting face: PE, and a bound for the MILP
        face = _best_on_face(p, ce)
        if face is not None and _acceptable(check_fair_pe(p, face)) and efficiency(p, face) > efficiency(p, ce):
            ce = face
    mx, minfo = pe_milp(p, pairs, efficiency(p, ce) if ce_ok else None, max(WEIGHT_RATIO, 2.0 * ratio),
                        min(t0 + MILP_TIME_LIMIT, deadline))
    info.update(minfo)
    if mx is not None:
        check = check_fair_pe(p, mx)
        info["milp_check"] = list(check)
        if _acceptable(check) and (not ce_ok or efficiency(p, mx) >= efficiency(p, ce) * (1 - 1e-9)):
            info["stage"] = "milp"
            return mx, info
    if ce_ok:
        info["stage"] = "ceei"
        return ce, info
    info["stage"] = "lp"
    if gain > ACCEPT_TOL:   # x* fails the test every candidate must pass: rare, with caps
        info["pareto_efficient"] = False   # docs/allocator.md
    return x, info


def _best_on_face(p: Problem, ce: np.ndarray) -> np.ndarray | None:
    """Max efficiency over SI, EF and the face of allocations maximising sum_i beta_i U_i
    with the CEEI's supporting weights beta_i = w_i/U_i (every point of it is Pareto
    efficient, the CEEI is one): LPs, EF rows lazily as in stage 1."""
    n, m, s = p.n, p.m, p.speedup
    beta = p.weights / np.maximum(utilities(p, ce), 1e-300)
    beta = beta / beta.min()
    rows, rhs = block_rows(p)
    wx = solve_lp(-(beta[:, None] * s).ravel(), rows, rhs, what="face LP")
    top = float((beta[:, None] * s).ravel() @ wx)
    base = equal_share_values(p)
    scale = np.maximum(base, 1e-12)
    lam = cut_prices(p, ce)
    fixed_a = sp.vstack([rows, -utility_rows(p), sp.csr_matrix(-(beta[:, None] * s).ravel()[None, :])]).tocsr()
    fixed_b = np.concatenate([rhs, -base * (1 - TOL), [-top * (1 - 1e-12)]])
    cuts = ef_pairs_tight(p, ce)
    for _ in range(20):
        cut_a, cut_b = ef_cut_rows(p, cuts, lam)
        res = linprog(-s.ravel(), A_ub=sp.vstack([fixed_a, cut_a]).tocsr(), b_ub=np.concatenate([fixed_b, cut_b]),
                      bounds=(0, None), method="highs", options=HIGHS)
        if res.status != 0:
            return None
        x = np.clip(res.x.reshape(n, m), 0.0, None)
        viol = ef_violations(p, x, lam, scale)
        new = np.argwhere(viol > TOL * 10)
        if len(new) == 0:
            return x
        cuts = np.unique(np.concatenate([cuts, new]), axis=0)
    return None
