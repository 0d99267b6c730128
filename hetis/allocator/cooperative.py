"""`cooperative`: the most efficient allocation that is SI and weighted EF, made
Pareto efficient (docs/allocator.md, "cooperative").

Stage 1 is here: the fair optimum x* by one HiGHS model that EF rows are added to
and aged out of (`fair_lp`), after merging interchangeable tenants (`groups`).
Stages 2 and 3 (pareto.py) check x* with the Pareto LP and, if it is dominated, look
for the most efficient SI+EF+PE allocation (the MILP of milp.py, the CEEI of ceei.py
as fall-back). Everything runs within one time budget; if stage 1 does not finish,
the result is the fixed-price exchange (SI and EF, proved) with the gap to the LP's
upper bound ("fallback"). Not strategy-proof; noncooperative.py is the mode that is.
"""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp

from .jobs import implementable, job_sizes, schedule
from .lp import (
    LP,
    TIME_BUDGET,
    TOL,
    block_rows,
    cut_prices,
    ef_cut_rows,
    ef_violations,
    utility_rows,
    violated_pairs,
)
from .noncooperative import noncooperative
from .pareto import pareto_stages
from .problem import Allocation, Problem, capped_price, efficiency, equal_share_values, groups

AGE = 2           # an EF row slack this many LP rounds in a row leaves the LP (it returns if violated)
KEEP_AFTER = 60   # LP rounds after which no row leaves any more (so the loop terminates)
# with multi-GPU jobs (`_with_jobs`), the fractions of the time limit by which stage 1,
# the Pareto stages, and the reachability checks or column generation must be done
# (stage 1 gets more where column generation is not tried, above JOBS_MAX_TENANTS)
JOBS_BLIND_SHARE = 0.3, 0.7
JOBS_PARETO_SHARE = 0.6, 0.85
JOBS_SHARE = 0.95
# above this many tenants column generation is not tried (it does not scale yet: 30 x 8
# in 0.5-0.8 s, 100 x 8 in 4.5 s: docs/allocator.md, Rounds), and an unreachable
# job-blind result is returned with info["implementable"] False
JOBS_MAX_TENANTS = 50
# a cap per unit of weight at least this many times the pool per unit of weight is tried as
# no cap (so such tenants merge); kept only if no tenant's bundle per weight reaches it
# (then every capped valuation is linear on every bundle: the same SI, EF and Pareto
# conditions), else retried with a higher threshold, LOOSE_TRIES times in all
LOOSE_CAP = 2.5
LOOSE_TRIES = 2
FINISH_SECONDS = 0.15  # of the time limit, kept for splitting merged tenants and the checks after stage 3


def cooperative(p: Problem, max_refine: int = 4, pareto: bool = True, time_limit: float = TIME_BUDGET,
                warm: list | None = None, jobs: dict | None = None) -> Allocation:
    """max sum_i U_i s.t. capacity, caps, SI and weighted EF, then made Pareto efficient,
    all within ``time_limit`` seconds.

    Stage 1 ("lp"): the fair optimum x*, HiGHS LPs (`fair_lp`). Stage 2: the Pareto LP;
    if no tenant can gain without another losing (relative gain <= PE_TOL), x* is
    returned. Stage 3 ("milp"): max efficiency over SI, EF and the supporting-price
    characterisation of Pareto efficiency (`pe_milp`); if it fails or runs out of time,
    "ceei": the weighted competitive equilibrium from equal incomes (Eisenberg-Gale),
    which is PE, SI and EF. Every stage-3 result is re-verified (SI, EF, Pareto LP).
    What is left of the budget bounds stages 2 and 3; without time for them the result
    says ``pareto_efficient`` False (checked, dominated) or None (not checked). If stage 1
    itself does not finish, "fallback": the fixed-price exchange (SI and EF).
    ``pareto=False`` stops after stage 1. ``warm``: pairs of tenant names whose EF rows
    to start from (``info["warm"]`` of an earlier result: the service's re-solves).
    ``info["stage"]`` says which stage produced x, ``info["gap"]`` how far its efficiency
    may be below the SI+EF optimum (relative; None when unknown).

    Interchangeable tenants (same speedups, same cap per weight) are merged into one
    of their total weight and cap: the LP is convex and symmetric in them, so it has
    an optimum giving them equal bundles per unit of weight, where EF among them
    holds with equality. The group's bundle is split in proportion to weight (which
    keeps a Pareto-efficient aggregate Pareto efficient: same supporting weight for
    every member).

    ``jobs`` (tenant -> [(job id, gpus)]): with a job of more than one GPU, x must be a
    mix of feasible rounds, so the rounds can reach it (`_with_jobs`): the job-blind
    result is kept when it is one (``info["implementable"]`` True, SI fraction 1);
    otherwise x is solved within those mixes (jobs.py: column generation, stage "lp",
    solver "colgen", no Pareto stages). With more than JOBS_MAX_TENANTS tenants, or if
    that does not finish within JOBS_SHARE of the budget, the job-blind result follows
    with ``info["implementable"]`` False.
    """
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    sizes = job_sizes(p, jobs) if jobs else {}
    if sizes:
        return _with_jobs(p, jobs, sizes, max_refine, pareto, time_limit, warm)
    capped = np.isfinite(p.caps)
    if capped.any():
        # caps that no bundle reaches change nothing: drop them, so those tenants merge
        bound = LOOSE_CAP * p.capacity.sum() / p.weights.sum()
        for _ in range(LOOSE_TRIES):
            loose = capped & (p.caps / p.weights >= bound)
            if not loose.any() or time.perf_counter() >= deadline:
                break
            q = Problem(p.gpu_types, p.capacity, p.tenants, p.weights, p.throughput,
                        np.where(loose, np.inf, p.caps), p.prices)
            out = _solve(q, max_refine, pareto, deadline, warm, t0)
            reach = float((out.x.sum(axis=1) / p.weights).max())
            if reach <= float((p.caps[loose] / p.weights[loose]).min()):
                out.info["caps_dropped"] = int(loose.sum())
                return out
            bound = max(bound * 2, reach * 1.5)
    return _solve(p, max_refine, pareto, deadline, warm, t0)


def _solve(p: Problem, max_refine: int, pareto: bool, deadline: float, warm: list | None,
           t0: float) -> Allocation:
    """`cooperative` for one Problem as given: merge, stage 1, stages 2 and 3."""
    group, first = groups(p)
    merged = len(first) < p.n
    if merged:
        wsum = np.bincount(group, weights=p.weights)
        q = Problem(p.gpu_types, p.capacity, tuple(p.tenants[i] for i in first), wsum, p.throughput[first],
                    p.caps[first] / p.weights[first] * wsum, p.prices)
    else:
        q = p
    fair = fair_lp(q, max_refine, deadline, _seed(p, q, group, warm))
    cuts, ever = fair.info.pop("_cuts"), fair.info.pop("_ever")
    info = {**fair.info, "stage": "lp", "gap": 0.0 if fair.info["optimal"] else None,
            "warm": [[q.tenants[i], q.tenants[k]] for i, k in cuts]}
    if fair.x is None:                       # out of time: the exchange is SI and EF by proof
        x = noncooperative(q).x
        ub = fair.info["upper_bound"]
        info.update(stage="fallback", pareto_efficient=None,
                    gap=None if ub is None else max(0.0, 1.0 - efficiency(q, x) / ub))
    else:
        x = fair.x
        if pareto and q.n == 1:              # one (merged) tenant at its LP optimum: nothing dominates it
            info["pareto_gain_lp"] = 0.0
        elif pareto:
            x, more = pareto_stages(q, x, ever, deadline - FINISH_SECONDS)
            info.update(more)
            if info["stage"] != "lp":        # efficiency given up for Pareto efficiency
                info["gap"] = max(0.0, 1.0 - efficiency(q, x) / fair.info["fair_efficiency"])
    info["stage1_seconds"] = fair.solve_seconds
    x = _within_limits(q, x)
    if merged:
        x = x[group] * (p.weights / wsum[group])[:, None]
        info["groups"] = len(first)
    return Allocation("cooperative", x, time.perf_counter() - t0, info)


def _with_jobs(p: Problem, jobs: dict, sizes: dict, max_refine: int, pareto: bool, time_limit: float,
               warm: list | None) -> Allocation:
    """`cooperative` when some tenant has a job of more than one GPU (its doc, ``jobs``).

    The job-blind fair optimum is the SI+EF optimum over a superset of the mixes of
    feasible rounds, so when it is such a mix (`jobs.schedule` finds the rounds) it is
    also the optimum among them, found with the merging that column generation lacks.
    Its Pareto stages then run, and their result is kept only where it is the fair
    optimum itself (then ``pareto_efficient`` True); a refined x is not used, since the
    rounds reach points on the hull's boundary slowest (the comment in the code), and the
    fair optimum is returned with ``pareto_efficient`` False. Only when the fair optimum
    is out of reach does column generation solve for x (`implementable`, seeded with the
    job-blind EF rows). If stage 1 fell back (out of time: large instances whose capped
    job tenants do not merge), the exchange's x is checked the same way.

    Budget (fractions of ``time_limit``, from the start): stage 1 by JOBS_BLIND_SHARE
    (it takes milliseconds to a second), the Pareto stages by JOBS_PARETO_SHARE (each
    the first of its pair, or the second above JOBS_MAX_TENANTS, where there is no column
    generation to keep time for), every check and column generation by JOBS_SHARE. Stage 3
    can use all the time it is given and fail, so it gets a bounded share here; it is not
    started with less than a tenth of the budget left for it."""
    t0 = time.perf_counter()
    by = lambda share: t0 + share * time_limit  # noqa: E731
    large = p.n > JOBS_MAX_TENANTS
    fair = cooperative(p, max_refine, False, JOBS_BLIND_SHARE[large] * time_limit, warm)
    job_tenants = [p.tenants[i] for i in sorted(sizes)]
    mix = schedule(p, sizes, fair.x, by(JOBS_SHARE))
    if mix is not None:
        out = fair
        left = by(JOBS_PARETO_SHARE[large]) - time.perf_counter()
        if pareto and fair.info["stage"] == "lp" and left >= 0.1 * time_limit:
            refined = cooperative(p, max_refine, True, left, fair.info["warm"])
            if np.allclose(refined.x, fair.x, rtol=0, atol=1e-9):
                out = refined                # the fair optimum is Pareto efficient as it is
            else:
                # a refined x sits on the boundary of the rounds' hull, where the packing of
                # rounds converges slowest: one that jobs.schedule found to be a mix missed by
                # 5.4 % after 100 rounds and 7.6 % after 400 (test_allocator_rounds, seed 0),
                # while every fair optimum there is reached within 3.1 %. So it is not used.
                fair.info["pareto_efficient"] = None if refined.info["stage"] == "fallback" else False
                fair.info["pareto_reason"] = "with multi-GPU jobs only a fair optimum that is already " \
                    "Pareto efficient is kept (a refined one is hard for the rounds to reach)"
        out.info.update(implementable=True, si_fraction=1.0, job_tenants=job_tenants, _schedule=mix)
        out.solve_seconds = time.perf_counter() - t0
        return out
    res = None
    if not large:
        res = implementable(p, jobs, by(JOBS_SHARE), max_refine, list(warm or ()) + fair.info.get("warm", []),
                            near=fair.x)
    if res is not None:
        res.solve_seconds = time.perf_counter() - t0
        return res
    fair.info["implementable"] = False
    fair.info["implementable_reason"] = f"more than {JOBS_MAX_TENANTS} tenants" if large else "out of time"
    fair.solve_seconds = time.perf_counter() - t0
    return fair


def _seed(p: Problem, q: Problem, group: np.ndarray, warm: list | None) -> np.ndarray:
    """EF pairs of q (merged indices) from an earlier result's pairs of tenant names."""
    if not warm:
        return np.zeros((0, 2), dtype=int)
    where = {t: group[i] for i, t in enumerate(p.tenants)}
    pairs = np.array([(where[a], where[b]) for a, b in warm if a in where and b in where], dtype=int)
    pairs = pairs.reshape(-1, 2)
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)


def _within_limits(p: Problem, x: np.ndarray) -> np.ndarray:
    """x >= 0 scaled down where an LP left a capacity or cap exceeded by its tolerance."""
    x = np.clip(x, 0.0, None)
    col = x.sum(axis=0)
    x = x * np.where(col > p.capacity, p.capacity / np.maximum(col, 1e-300), 1.0)[None, :]
    row = x.sum(axis=1)
    return x * np.where(row > p.caps, p.caps / np.maximum(row, 1e-300), 1.0)[:, None]


def fair_lp(p: Problem, max_refine: int = 4, deadline: float = math.inf,
            seed: np.ndarray | None = None) -> Allocation:
    """Stage 1 of `cooperative` for distinct tenants: max efficiency s.t. SI and EF.

    One HiGHS model (`LP`) holds capacity, caps and SI rows and a working set of EF
    rows: solve, add each tenant's few most violated pairs, re-solve from the previous
    basis; a row slack for AGE rounds in a row is dropped (it comes back if violated
    again), so the LP stays near the few hundred rows that bind. ``seed``: EF pairs to
    start with. EF against a capped valuation f_i is not convex; each pair's condition
    is enforced through the linear upper bound d_i*lam + sum_j a_j (s_ij - lam)^+ >=
    f_i(a) at a fixed lam. It starts at the price of i's capped equal share (so the
    capped equal split is feasible) and is re-priced at the optimum's bundles; every
    re-priced LP keeps the previous optimum feasible, so efficiency never decreases.
    Without binding caps lam = 0 and the LP is exactly max efficiency s.t. SI and EF.

    ``x`` is None if the deadline came before the first optimum; ``info["upper_bound"]``
    is then the last relaxation's objective (a bound on the SI+EF optimum without caps;
    None with caps, where the lam-priced rows are not a relaxation).
    """
    t0 = time.perf_counter()
    n, m, s = p.n, p.m, p.speedup
    base = equal_share_values(p)
    scale = np.maximum(base, 1e-12)
    rows, rhs = block_rows(p)
    fixed = rows.shape[0] + n
    capped = np.isfinite(p.caps)
    lam = np.zeros((n, n))
    lam[capped] = capped_price(s[capped], p.caps[capped], p.equal_share[capped])[:, None]
    cuts = np.zeros((0, 2), dtype=int) if seed is None else np.asarray(seed, dtype=int).reshape(-1, 2)
    lp = LP(-s.ravel(), sp.vstack([rows, -utility_rows(p)]).tocsr(), np.concatenate([rhs, -base * (1 - TOL)]))
    lp.add(*ef_cut_rows(p, cuts, lam))
    age = np.zeros(len(cuts), dtype=int)
    ever = [cuts]          # every pair that was ever a row: stage 3's MILP starts from them
    best, best_eff, bound, solves, added, refines, prev = None, -np.inf, None, 0, 0, 0, -np.inf
    while True:
        while True:
            z = lp.solve(deadline)
            if z is None:
                break
            solves += 1
            x = np.clip(z.reshape(n, m), 0.0, None)
            if not capped.any():
                bound = -lp.objective
            new = violated_pairs(ef_violations(p, x, lam, scale)) if n > 1 else np.zeros((0, 2), dtype=int)
            if len(new) == 0:
                break
            if solves < KEEP_AFTER and len(cuts):
                _, cut_b = ef_cut_rows(p, cuts, lam)
                slack = (cut_b - lp.row_values()[fixed:]) / scale[cuts[:, 0]] > TOL * 10
                age = np.where(slack, age + 1, 0)
                gone = np.flatnonzero(age >= AGE)
                lp.delete(fixed + gone)
                cuts, age = np.delete(cuts, gone, axis=0), np.delete(age, gone)
            lp.add(*ef_cut_rows(p, new, lam))
            ever.append(new)
            cuts, age, added = np.concatenate([cuts, new]), np.concatenate([age, np.zeros(len(new), int)]), \
                added + len(new)
        if z is None:
            break
        eff = float((s * x).sum())
        if eff > best_eff:
            best, best_eff = x, eff
        if not capped.any() or refines >= max_refine or (refines and eff <= prev * (1 + 1e-9)):
            break
        prev, refines = eff, refines + 1
        lam = np.where(capped[:, None], cut_prices(p, x), 0.0)
        lp.delete(fixed + np.arange(len(cuts)))
        lp.add(*ef_cut_rows(p, cuts, lam))
    return Allocation("cooperative", best, time.perf_counter() - t0,
                      {"lp_solves": solves, "ef_cuts": int(len(cuts)), "ef_cuts_added": added,
                       "refinements": refines, "optimal": z is not None,
                       "fair_efficiency": best_eff if best is not None else None,
                       "upper_bound": best_eff if z is not None and best is not None else bound, "_cuts": cuts,
                       "_ever": np.unique(np.concatenate(ever), axis=0)})
