"""Stage 3's MILP: max efficiency over SI, exact weighted EF and Pareto efficiency.

PE is written through supporting prices (x maximises some weighted welfare; its
LP duals, with binaries for complementary slackness), and a capped tenant's envy as
a disjunction over its candidate cap prices (`_ef_rows_exact`). `pe_milp` has the
formulation; pareto.py decides when to run it and verifies what it returns.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from .lp import CUTS_PER_TENANT, HIGHS, TOL, block_rows, stdout_to_stderr, utility_rows
from .problem import Problem, envy_values, equal_share_values, utilities


def pe_milp(p: Problem, pairs: np.ndarray, lower: float | None, ratio: float,
            deadline: float) -> tuple[np.ndarray | None, dict]:
    """max sum_i U_i over SI, EF (exact, `_ef_rows_exact`) and Pareto efficiency, a MILP.

    x is Pareto efficient iff it maximises sum_i beta_i U_i over capacity and caps for
    some beta > 0 (a polytope: efficient = properly efficient). Scaled to beta_i in
    [1, ratio], LP duality gives prices p_j >= 0 and cap prices mu_i >= 0 with
        beta_i s_ij - mu_i <= p_j                        (dual feasibility)
        x_ij > 0        => beta_i s_ij - mu_i = p_j      (binary z_ij)
        p_j > 0         => type j fully allocated        (binary y_j)
        mu_i > 0        => tenant i at its cap           (binary v_i)
    with big-M bounds p_j <= ratio max_i s_ij, mu_i <= ratio max_j s_ij (a minimal dual
    never exceeds them). The MILP's binaries are then fixed and the rest re-solved as an
    LP (exact certificate, no big-M tolerance). EF pairs are added lazily.
    Variables: x (nm), beta (n), p (m), mu (n), z (nm), y (m), v (n)."""
    n, m, s = p.n, p.m, p.speedup
    nm = n * m
    capped = np.isfinite(p.caps)
    base = equal_share_values(p)
    scale = np.maximum(base, 1e-12)
    ox, ob, op, om, oz, oy, ov = 0, nm, nm + n, nm + n + m, nm + 2 * n + m, 2 * nm + 2 * n + m, 2 * nm + 2 * n + 2 * m
    N = ov + n
    xmax = np.minimum(p.capacity[None, :], np.where(capped, p.caps, np.inf)[:, None]) * (s > 0)
    pbar = ratio * s.max(axis=0)
    mubar = np.where(capped, ratio * s.max(axis=1), 0.0)
    lb = np.zeros(N)
    ub = np.concatenate([xmax.ravel(), np.full(n, ratio), pbar, mubar, (xmax > 0).ravel().astype(float),
                         np.ones(m), capped.astype(float)])
    lb[ob:op] = 1.0
    ii, jj = np.divmod(np.arange(nm), m)
    k = np.arange(nm)

    def coo(r, c, v, nrows):
        return sp.csr_matrix((v, (r, c)), shape=(nrows, N))

    rows, rhs = block_rows(p)
    blocks = [sp.hstack([rows, sp.csr_matrix((rows.shape[0], N - nm))]).tocsr()]
    b = [rhs]
    blocks.append(sp.hstack([-utility_rows(p), sp.csr_matrix((n, N - nm))]).tocsr())     # SI
    b.append(-base * (1 - TOL))
    blocks.append(coo(np.repeat(k, 3), np.stack([ob + ii, om + ii, op + jj], 1).ravel(),
                      np.stack([s.ravel(), -np.ones(nm), -np.ones(nm)], 1).ravel(), nm))  # dual feasibility
    b.append(np.zeros(nm))
    blocks.append(coo(np.repeat(k, 2), np.stack([ox + k, oz + k], 1).ravel(),
                      np.stack([np.ones(nm), -xmax.ravel()], 1).ravel(), nm))              # x > 0 => z
    b.append(np.zeros(nm))
    big = pbar[jj] + mubar[ii]
    blocks.append(coo(np.repeat(k, 4), np.stack([op + jj, om + ii, ob + ii, oz + k], 1).ravel(),
                      np.stack([np.ones(nm), np.ones(nm), -s.ravel(), big], 1).ravel(), nm))  # z => tight
    b.append(big)
    blocks.append(coo(np.repeat(np.arange(m), 2), np.stack([op + np.arange(m), oy + np.arange(m)], 1).ravel(),
                      np.stack([np.ones(m), -pbar], 1).ravel(), m))                        # p_j > 0 => y_j
    b.append(np.zeros(m))
    full = sp.hstack([-sp.kron(np.ones((1, n)), sp.eye(m)), sp.csr_matrix((m, N - nm))]).tocsr()
    blocks.append(full + coo(np.arange(m), oy + np.arange(m), p.capacity, m))              # y_j => full
    b.append(np.zeros(m))
    ci = np.flatnonzero(capped)
    if len(ci):
        blocks.append(coo(np.repeat(np.arange(len(ci)), 2), np.stack([om + ci, ov + ci], 1).ravel(),
                          np.stack([np.ones(len(ci)), -mubar[ci]], 1).ravel(), len(ci)))  # mu_i > 0 => v_i
        b.append(np.zeros(len(ci)))
        at_cap = sp.hstack([-sp.kron(sp.eye(n).tocsr()[ci], np.ones((1, m))), sp.csr_matrix((len(ci), N - nm))])
        blocks.append(at_cap.tocsr() + coo(np.arange(len(ci)), ov + ci, p.caps[ci], len(ci)))  # v_i => at cap
        b.append(np.zeros(len(ci)))
    if lower is not None:                                                                  # >= the CEEI
        blocks.append(coo(np.zeros(nm, dtype=int), k, -s.ravel(), 1))
        b.append(np.array([-lower * (1 - 1e-6)]))
    fixed_a, fixed_b = sp.vstack(blocks).tocsr(), np.concatenate(b)
    c = np.zeros(N)
    c[:nm] = -s.ravel()
    integrality = np.zeros(N)
    integrality[oz:] = 1
    info: dict = {"milp_solves": 0}
    pairs = pairs.reshape(-1, 2)
    while True:
        if deadline <= time.perf_counter():
            info["milp_status"] = "time limit"
            return None, info
        cut_a, cut_b, nd = _ef_rows_exact(p, pairs)
        a = sp.vstack([sp.hstack([fixed_a, sp.csr_matrix((fixed_a.shape[0], nd))]), cut_a]).tocsr()
        bb = np.concatenate([fixed_b, cut_b])
        cc, lo = np.concatenate([c, np.zeros(nd)]), np.concatenate([lb, np.zeros(nd)])
        hi = np.concatenate([ub, np.ones(nd)])
        left = deadline - time.perf_counter()         # after the rows: building them can take a second
        if left <= 0:
            info["milp_status"] = "time limit"
            return None, info
        with stdout_to_stderr():
            res = milp(cc, integrality=np.concatenate([integrality, np.ones(nd)]), bounds=Bounds(lo, hi),
                       constraints=LinearConstraint(a, -np.inf, bb),
                       options={"time_limit": left, "mip_rel_gap": 1e-6, "presolve": True})
        info["milp_solves"] += 1
        info["milp_status"] = res.message
        info["milp_gap"] = float(getattr(res, "mip_gap", np.nan) or 0.0)
        if res.x is None:
            return None, info
        lo[oz:] = hi[oz:] = np.round(res.x[oz:])     # binaries fixed: an LP, exact certificate
        pol = linprog(cc, A_ub=a, b_ub=bb, bounds=np.stack([lo, hi], 1), method="highs", options=HIGHS)
        info["polished"] = pol.status == 0
        z = pol.x if pol.status == 0 else res.x
        x = np.clip(z[:nm].reshape(n, m), 0.0, None)
        v = envy_values(p, x)
        np.fill_diagonal(v, -np.inf)
        viol = (v - utilities(p, x)[:, None]) / scale[:, None]
        worst = np.argsort(-viol, axis=1)[:, :CUTS_PER_TENANT]
        new = np.stack([np.repeat(np.arange(n), worst.shape[1]), worst.ravel()], axis=1)
        new = new[viol[new[:, 0], new[:, 1]] > TOL * 10]
        if len(new) == 0:
            info["weights"] = z[ob:op].tolist()
            return x, info
        pairs = np.unique(np.concatenate([pairs, new]), axis=0)


def _ef_rows_exact(p: Problem, pairs: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, int]:
    """Exact EF rows for pairs (i, k) over x (the first nm columns of the stage-3 MILP)
    plus nd new binary columns. Uncapped i: U_i >= (w_i/w_k) s_i.x_k. Capped i:
    f_i(a) = min_lam d_i lam + sum_j a_j (s_ij - lam)^+, attained at lam in {0} or a
    speed of i, so f_i(a) <= U_i iff one of these bounds is <= U_i: one binary per
    candidate lam (delta = 1 enforces that bound), at least one chosen."""
    n, m, s = p.n, p.m, p.speedup
    nm = n * m
    N = 2 * nm + 3 * n + 2 * m
    r, cidx, val, rhs = [], [], [], []
    nd, row = 0, 0
    for i, k in pairs:
        ratio = p.weights[i] / p.weights[k]
        lams = [0.0] if not np.isfinite(p.caps[i]) else sorted({0.0, *s[i][s[i] > 0]})
        first = nd
        for lam in lams:
            q = ratio * np.clip(s[i] - lam, 0.0, None)
            r += [row] * (2 * m)
            cidx += list(i * m + np.arange(m)) + list(k * m + np.arange(m))
            val += list(-s[i]) + list(q)
            if len(lams) == 1:
                rhs.append(0.0)
            else:   # -U_i + d lam + q.x_k + M delta <= M
                big = p.caps[i] * lam + q @ p.capacity
                r.append(row)
                cidx.append(N + nd)
                val.append(big)
                rhs.append(big - p.caps[i] * lam)
                nd += 1
            row += 1
        if len(lams) > 1:
            r += [row] * (nd - first)
            cidx += list(range(N + first, N + nd))
            val += [-1.0] * (nd - first)
            rhs.append(-1.0)
            row += 1
    a = sp.csr_matrix((val, (r, cidx)), shape=(row, N + nd))
    return a, np.array(rhs), nd
