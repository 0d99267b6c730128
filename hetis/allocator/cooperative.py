"""`cooperative`: the most efficient allocation that is SI and weighted EF, made
Pareto efficient (docs/allocator.md, "cooperative").

Stage 1 is here: the fair optimum x* by HiGHS LPs (`fair_lp`), after merging
interchangeable tenants (`groups`). Stages 2 and 3 (pareto.py) check x* with the
Pareto LP and, if it is dominated, look for the most efficient SI+EF+PE allocation
(the MILP of milp.py, the CEEI of ceei.py as fall-back). Not strategy-proof;
noncooperative.py is the mode that is.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from .lp import (CUTS_PER_TENANT, MILP_TIME_LIMIT, TOL, block_rows, ef_cut_rows, ef_violations,
                 solve_lp, utility_rows)
from .pareto import pareto_stages
from .problem import Allocation, Problem, capped_price, equal_share_values


def groups(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Tenants with the same speedup vector and cap per unit of weight are interchangeable:
    (group index per tenant, first member per group)."""
    key = np.concatenate([p.speedup, (p.caps / p.weights)[:, None]], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return inverse.ravel(), first


def cooperative(p: Problem, max_refine: int = 4, pareto: bool = True,
                time_limit: float = MILP_TIME_LIMIT) -> Allocation:
    """max sum_i U_i s.t. capacity, caps, SI and weighted EF, then made Pareto efficient.

    Stage 1 ("lp"): the fair optimum x*, HiGHS LPs (`fair_lp`). Stage 2: the
    Pareto LP; if no tenant can gain without another losing (relative gain <= PE_TOL),
    x* is returned. Stage 3 ("milp"): max efficiency over SI, EF and the supporting-price
    characterisation of Pareto efficiency (`pe_milp`); if it fails or runs out of time,
    "ceei": the weighted competitive equilibrium from equal incomes (Eisenberg-Gale),
    which is PE, SI and EF. Every stage-3 result is re-verified (SI, EF, Pareto LP).
    ``pareto=False`` stops after stage 1. ``info["stage"]`` says which stage produced x.

    Interchangeable tenants (same speedups, same cap per weight) are merged into one
    of their total weight and cap: the LP is convex and symmetric in them, so it has
    an optimum giving them equal bundles per unit of weight, where EF among them
    holds with equality. The group's bundle is split in proportion to weight (which
    keeps a Pareto-efficient aggregate Pareto efficient: same supporting weight for
    every member).
    """
    t0 = time.perf_counter()
    group, first = groups(p)
    merged = len(first) < p.n
    if merged:
        wsum = np.bincount(group, weights=p.weights)
        q = Problem(p.gpu_types, p.capacity, tuple(p.tenants[i] for i in first), wsum, p.throughput[first],
                    p.caps[first] / p.weights[first] * wsum, p.prices)
    else:
        q = p
    fair = fair_lp(q, max_refine)
    cuts = fair.info.pop("_cuts")
    x, info = fair.x, {**fair.info, "stage": "lp"}
    if pareto and q.n > 1:
        x, more = pareto_stages(q, x, cuts, time_limit)
        info.update(more)
    x = _within_limits(q, x)
    if merged:
        x = x[group] * (p.weights / wsum[group])[:, None]
        info["groups"] = len(first)
    return Allocation("cooperative", x, time.perf_counter() - t0, info)


def _within_limits(p: Problem, x: np.ndarray) -> np.ndarray:
    """x >= 0 scaled down where an LP left a capacity or cap exceeded by its tolerance."""
    x = np.clip(x, 0.0, None)
    col = x.sum(axis=0)
    x = x * np.where(col > p.capacity, p.capacity / np.maximum(col, 1e-300), 1.0)[None, :]
    row = x.sum(axis=1)
    return x * np.where(row > p.caps, p.caps / np.maximum(row, 1e-300), 1.0)[:, None]


def fair_lp(p: Problem, max_refine: int = 4) -> Allocation:
    """Stage 1 of `cooperative` for distinct tenants: max efficiency s.t. SI and EF, LPs.

    EF rows are added lazily (solve, add the violated pairs, re-solve). EF against a
    capped valuation f_i is not convex; each pair's condition is enforced through
    the linear upper bound d_i*lam + sum_j a_j (s_ij - lam)^+ >= f_i(a) at a fixed
    lam. It starts at the price of i's capped equal share (so the capped equal
    split is feasible) and is re-priced at the optimum's bundles; every re-priced
    LP keeps the previous optimum feasible, so efficiency never decreases. Without
    binding caps lam = 0 and the LP is exactly max efficiency s.t. SI and EF.
    """
    t0 = time.perf_counter()
    n, m, s = p.n, p.m, p.speedup
    base = equal_share_values(p)
    scale = np.maximum(base, 1e-12)
    rows, rhs = block_rows(p)
    urows = utility_rows(p)
    fixed_a = sp.vstack([rows, -urows]).tocsr()
    fixed_b = np.concatenate([rhs, -base * (1 - TOL)])
    capped = np.isfinite(p.caps)
    lam = np.zeros((n, n))
    lam[capped] = capped_price(s[capped], p.caps[capped], p.equal_share[capped])[:, None]
    cuts = np.zeros((0, 2), dtype=int)
    best, best_eff, lp_solves, refines = None, -np.inf, 0, 0
    while True:
        while True:
            cut_a, cut_b = ef_cut_rows(p, cuts, lam)
            xf = solve_lp(-s.ravel(), sp.vstack([fixed_a, cut_a]).tocsr(),
                          np.concatenate([fixed_b, cut_b]), what="cooperative LP")
            lp_solves += 1
            x = np.clip(xf.reshape(n, m), 0.0, None)
            viol = ef_violations(p, x, lam, scale) if n > 1 else np.zeros((n, n))
            # per envious tenant, only its few most violated pairs: most pairs never bind
            worst = np.argsort(-viol, axis=1)[:, :CUTS_PER_TENANT]
            rows_i = np.repeat(np.arange(n), worst.shape[1])
            new = np.stack([rows_i, worst.ravel()], axis=1)
            new = new[viol[new[:, 0], new[:, 1]] > TOL * 10]
            if len(new) == 0:
                break
            cuts = np.unique(np.concatenate([cuts, new]), axis=0)
        eff = float((s * x).sum())
        if eff > best_eff:
            best, best_eff = x, eff
        if not capped.any() or refines >= max_refine or (refines and eff <= prev * (1 + 1e-9)):
            break
        prev, refines = eff, refines + 1
        scaled = (p.weights[:, None, None] / p.weights[None, :, None]) * x[None, :, :]
        new_lam = capped_price(np.broadcast_to(s[:, None, :], scaled.shape),
                               np.broadcast_to(p.caps[:, None], (n, n)), scaled)
        lam = np.where(capped[:, None], new_lam, 0.0)
    return Allocation("cooperative", best, time.perf_counter() - t0,
                      {"lp_solves": lp_solves, "ef_cuts": int(len(cuts)), "refinements": refines,
                       "fair_efficiency": best_eff, "_cuts": cuts})
