"""OEF: efficient and fair division of a heterogeneous GPU pool (docs/allocator.md).

Definitions (papers/oef.md, extended to demand caps):
- speedup s_ij = T_ij / min_{j: T_ij > 0} T_ij; allocation x_ij >= 0 (GPUs, fractional
  = time share over rounds); efficiency = sum_i U_i.
- f_i(a) = value to tenant i of bundle a: the best d_i GPUs of a (d_i = demand cap, inf
  if none): f_i(a) = max { s_i.y : 0 <= y <= a, sum y <= d_i }. Its own allocation never
  exceeds d_i, so U_i = f_i(x_i) = s_i.x_i.
- equal share e_i = w_i / sum(w) * c; SI: U_i >= f_i(e_i) (the *capped* equal share).
- weighted EF: U_i >= f_i(w_i / w_k * x_k) for every k (a tenant of weight w is w
  identical tenants of weight 1, each with cap d_i / w_i).

`cooperative` solves max sum U_i subject to capacity, caps, SI and EF as LPs with
HiGHS, checks Pareto efficiency with an LP and, if that optimum is Pareto dominated,
maximises efficiency over SI, EF and PE as a MILP (CEEI as fall-back);
`noncooperative` is the fixed-price pairwise exchange (strategy-proof, SI, EF).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

TOL = 1e-9  # relative tolerance of the LPs and of the cut generation
CUTS_PER_TENANT = 3  # EF rows added per tenant and LP round
HIGHS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
PE_TOL = 1e-9  # stage 2: a relative Pareto gain up to this counts as none
ACCEPT_TOL = 1e-7  # stage 3: SI/EF slack and Pareto gain a candidate must meet (relative)
MILP_TIME_LIMIT = 10.0  # seconds for stage 3's MILPs together
WEIGHT_RATIO = 64.0  # stage 3: supporting welfare weights range over [1, max(WEIGHT_RATIO, 2 R_ceei)]


@dataclass(frozen=True)
class Problem:
    """An instance: GPU types with capacities, tenants with weights, raw throughputs
    (per GPU, any unit: only ratios within a tenant matter) and demand caps.
    ``prices`` are public exchange rates used only by `noncooperative` (default 1:1)."""
    gpu_types: tuple[str, ...]
    capacity: np.ndarray            # (m,)
    tenants: tuple[str, ...]
    weights: np.ndarray             # (n,)
    throughput: np.ndarray          # (n, m) >= 0, each row has a positive entry
    caps: np.ndarray                # (n,), inf = no cap
    prices: np.ndarray | None = None

    def __post_init__(self):
        n, m = len(self.tenants), len(self.gpu_types)
        for name, arr, shape in (("capacity", self.capacity, (m,)), ("weights", self.weights, (n,)),
                                 ("throughput", self.throughput, (n, m)), ("caps", self.caps, (n,))):
            if np.shape(arr) != shape:
                raise ValueError(f"{name}: shape {np.shape(arr)}, expected {shape}")
        if np.any(self.capacity < 0) or not np.all(np.isfinite(self.capacity)):
            raise ValueError("capacity: every GPU count must be a finite number >= 0")
        if np.any(~np.isfinite(self.weights)) or np.any(self.weights <= 0):
            raise ValueError("weights: every weight must be finite and > 0")
        if np.any(~np.isfinite(self.throughput)) or np.any(self.throughput < 0):
            raise ValueError("throughput: every value must be finite and >= 0")
        bad = [t for t, row in zip(self.tenants, self.throughput) if not np.any(row > 0)]
        if bad:
            raise ValueError(f"throughput: tenant {bad[0]!r} has no positive throughput on any GPU type")
        if np.any(np.isnan(self.caps)) or np.any(self.caps < 0):
            raise ValueError("caps: every demand cap must be >= 0 (inf for none)")
        if self.prices is not None and (np.shape(self.prices) != (m,) or np.any(~(self.prices > 0))
                                        or not np.all(np.isfinite(self.prices))):
            raise ValueError("prices: one finite price > 0 per GPU type")

    @classmethod
    def build(cls, gpus: dict[str, float], tenants: list[dict], prices: dict[str, float] | None = None
              ) -> "Problem":
        """From plain data: ``tenants`` = [{name, throughput: {type: v}, weight=1, max_gpus=None}]."""
        types = tuple(gpus)
        thr = np.array([[float(t["throughput"].get(g, 0.0)) for g in types] for t in tenants]).reshape(
            len(tenants), len(types))
        caps = np.array([math.inf if t.get("max_gpus") is None else float(t["max_gpus"]) for t in tenants])
        return cls(types, np.array([float(gpus[g]) for g in types]), tuple(t["name"] for t in tenants),
                   np.array([float(t.get("weight", 1.0)) for t in tenants]), thr, caps,
                   None if prices is None else np.array([float(prices.get(g, 1.0)) for g in types]))

    @property
    def n(self) -> int:
        return len(self.tenants)

    @property
    def m(self) -> int:
        return len(self.gpu_types)

    @property
    def speedup(self) -> np.ndarray:
        t = self.throughput
        low = np.where(t > 0, t, np.inf).min(axis=1, keepdims=True)
        return t / low

    @property
    def equal_share(self) -> np.ndarray:
        return (self.weights / self.weights.sum())[:, None] * self.capacity[None, :]


@dataclass
class Allocation:
    mode: str
    x: np.ndarray                   # (n, m) GPUs per tenant and type
    solve_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def as_dict(self, p: Problem, digits: int = 6) -> dict[str, dict[str, float]]:
        return {t: {g: round(float(v), digits) for g, v in zip(p.gpu_types, row)}
                for t, row in zip(p.tenants, self.x)}


# ---------------------------------------------------------------- valuations

def capped_value(s: np.ndarray, d: np.ndarray, a: np.ndarray) -> np.ndarray:
    """f(a) = best d GPUs of bundle a, batched: s (..., m), d (...), a (..., m) -> (...)."""
    order = np.argsort(-s, axis=-1)
    s_sorted = np.take_along_axis(s, order, axis=-1)
    a_sorted = np.take_along_axis(np.broadcast_to(a, np.broadcast_shapes(a.shape, s.shape)), order, axis=-1)
    before = np.cumsum(a_sorted, axis=-1) - a_sorted
    room = np.clip(np.asarray(d)[..., None] - before, 0.0, None)
    return (s_sorted * np.minimum(a_sorted, room)).sum(axis=-1)


def capped_price(s: np.ndarray, d: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The optimal dual price lambda of the cap in f(a) (0 when the cap does not bind):
    f(a) = min_lambda>=0 d*lambda + sum_j a_j (s_j - lambda)^+, attained at the speed of
    the marginal type of the best-d selection."""
    order = np.argsort(-s, axis=-1)
    s_sorted = np.take_along_axis(s, order, axis=-1)
    a_sorted = np.take_along_axis(np.broadcast_to(a, np.broadcast_shapes(a.shape, s.shape)), order, axis=-1)
    cum = np.cumsum(a_sorted, axis=-1)
    d = np.asarray(d)[..., None]
    with np.errstate(invalid="ignore"):
        reached = cum >= d - 1e-12 * np.maximum(d, 1.0)
    first = np.argmax(reached, axis=-1)
    lam = np.take_along_axis(s_sorted, first[..., None], axis=-1)[..., 0]
    return np.where(reached.any(axis=-1), lam, 0.0)


def best_within_cap(s: np.ndarray, d: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The bundle achieving f(a) per row (fastest types first): s, a (n, m), d (n,)."""
    order = np.argsort(-s, axis=1)
    a_sorted = np.take_along_axis(a, order, axis=1)
    before = np.cumsum(a_sorted, axis=1) - a_sorted
    keep = np.minimum(a_sorted, np.clip(d[:, None] - before, 0.0, None))
    out = np.empty_like(a)
    np.put_along_axis(out, order, keep, axis=1)
    return out


def utilities(p: Problem, x: np.ndarray) -> np.ndarray:
    return capped_value(p.speedup, p.caps, x)


def equal_share_values(p: Problem) -> np.ndarray:
    return capped_value(p.speedup, p.caps, p.equal_share)


def envy_values(p: Problem, x: np.ndarray) -> np.ndarray:
    """(n, n): V[i, k] = f_i(w_i / w_k * x_k), tenant i's value of k's bundle at i's weight."""
    scaled = (p.weights[:, None, None] / p.weights[None, :, None]) * x[None, :, :]
    s = np.broadcast_to(p.speedup[:, None, :], scaled.shape)
    return capped_value(s, np.broadcast_to(p.caps[:, None], scaled.shape[:2]), scaled)


def si_slack(p: Problem, x: np.ndarray) -> np.ndarray:
    """(U_i - f_i(e_i)) / f_i(e_i): >= 0 iff SI holds (relative, dimensionless)."""
    base = equal_share_values(p)
    return (utilities(p, x) - base) / np.maximum(base, 1e-300)


def ef_slack(p: Problem, x: np.ndarray) -> np.ndarray:
    """min_k (U_i - f_i(w_i/w_k x_k)) / f_i(e_i): >= 0 iff tenant i envies nobody."""
    if p.n < 2:
        return np.zeros(p.n)
    v = envy_values(p, x)
    np.fill_diagonal(v, -np.inf)
    base = np.maximum(equal_share_values(p), 1e-300)
    return (utilities(p, x) - v.max(axis=1)) / base


def most_envied(p: Problem, x: np.ndarray) -> list[str]:
    if p.n < 2:
        return [""] * p.n
    v = envy_values(p, x)
    np.fill_diagonal(v, -np.inf)
    return [p.tenants[k] for k in v.argmax(axis=1)]


def efficiency(p: Problem, x: np.ndarray) -> float:
    return float(utilities(p, x).sum())


# ---------------------------------------------------------------- LP helpers

def _finite(a: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------- cooperative

def _ef_cut_rows(p: Problem, pairs: np.ndarray, lam: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """EF cuts -s_i.x_i + (w_i/w_k) (s_i - lam_ik)^+ . x_k <= -d_i lam_ik for pairs (i, k)."""
    n, m, s = p.n, p.m, p.speedup
    i, k = pairs[:, 0], pairs[:, 1]
    lk = lam[i, k]
    q = np.clip(s[i] - lk[:, None], 0.0, None) * (p.weights[i] / p.weights[k])[:, None]
    r = np.repeat(np.arange(len(pairs)), 2 * m)
    cols = np.concatenate([i[:, None] * m + np.arange(m), k[:, None] * m + np.arange(m)], axis=1).ravel()
    vals = np.concatenate([-s[i], q], axis=1).ravel()
    rhs = -np.where(lk > 0, _finite(p.caps)[i] * lk, 0.0)
    return sp.csr_matrix((vals, (r, cols)), shape=(len(pairs), n * m)), rhs


def _ef_violations(p: Problem, x: np.ndarray, lam: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Relative violation of every pair's (linear, lam-priced) EF condition, (n, n)."""
    s = p.speedup
    q = np.clip(s[:, None, :] - lam[:, :, None], 0.0, None)          # (n, n, m)
    bound = np.where(lam > 0, _finite(p.caps)[:, None] * lam, 0.0) + (
        p.weights[:, None] / p.weights[None, :]) * np.einsum("ikm,km->ik", q, x)
    v = (bound - (s * x).sum(axis=1)[:, None]) / scale[:, None]
    np.fill_diagonal(v, -np.inf)
    return v


def _groups(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Tenants with the same speedup vector and cap per unit of weight are interchangeable:
    (group index per tenant, first member per group)."""
    key = np.concatenate([p.speedup, (p.caps / p.weights)[:, None]], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return inverse.ravel(), first


def cooperative(p: Problem, max_refine: int = 4, pareto: bool = True,
                time_limit: float = MILP_TIME_LIMIT) -> Allocation:
    """max sum_i U_i s.t. capacity, caps, SI and weighted EF, then made Pareto efficient.

    Stage 1 ("lp"): the fair optimum x*, HiGHS LPs (`_cooperative`). Stage 2: the
    Pareto LP; if no tenant can gain without another losing (relative gain <= PE_TOL),
    x* is returned. Stage 3 ("milp"): max efficiency over SI, EF and the supporting-price
    characterisation of Pareto efficiency (`_pe_milp`); if it fails or runs out of time,
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
    group, first = _groups(p)
    merged = len(first) < p.n
    if merged:
        wsum = np.bincount(group, weights=p.weights)
        q = Problem(p.gpu_types, p.capacity, tuple(p.tenants[i] for i in first), wsum, p.throughput[first],
                    p.caps[first] / p.weights[first] * wsum, p.prices)
    else:
        q = p
    fair = _cooperative(q, max_refine, t0)
    cuts = fair.info.pop("_cuts")
    x, info = fair.x, {**fair.info, "stage": "lp"}
    if pareto and q.n > 1:
        x, more = _pareto_stages(q, x, cuts, time_limit)
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


def _cooperative(p: Problem, max_refine: int, t0: float) -> Allocation:
    """The LP of `cooperative` for distinct tenants.

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
            cut_a, cut_b = _ef_cut_rows(p, cuts, lam)
            xf = solve_lp(-s.ravel(), sp.vstack([fixed_a, cut_a]).tocsr(),
                          np.concatenate([fixed_b, cut_b]), what="cooperative LP")
            lp_solves += 1
            x = np.clip(xf.reshape(n, m), 0.0, None)
            viol = _ef_violations(p, x, lam, scale) if n > 1 else np.zeros((n, n))
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


# ---------------------------------------------------------------- noncooperative

def noncooperative(p: Problem) -> Allocation:
    """Fixed-price pairwise exchange (FPX): strategy-proof, SI and weighted EF.

    1. Every tenant starts from its weighted equal share e_i and splits its share of
       each type j into m-1 equal chips, one per market {j, l}.
    2. In market {j, l} a tenant with s_il/p_l > s_ij/p_j offers its j-chip for l at
       the public rate p_j/p_l (and vice versa; ties do not trade). The shorter side
       trades fully, the longer side is rationed in proportion to its chips.
    3. A tenant with a cap keeps the best d_i GPUs of the result; the rest stays idle.
    Prices p are public (never from reports); if some cap binds at the equal share
    they fall back to 1:1, which keeps GPU counts and so the caps' proofs intact.
    Proofs in docs/allocator.md.
    """
    t0 = time.perf_counter()
    n, m, s = p.n, p.m, p.speedup
    e = p.equal_share
    capped_at_e = bool(np.any(p.caps < e.sum(axis=1) * (1 - 1e-12)))
    prices = np.ones(m) if p.prices is None or capped_at_e else p.prices
    x = e.copy()
    chips = e / max(m - 1, 1)
    traded = 0.0
    for j in range(m):
        for l in range(j + 1, m):
            vj, vl = s[:, j] / prices[j], s[:, l] / prices[l]
            sell_j = vl > vj * (1 + 1e-12)
            sell_l = vj > vl * (1 + 1e-12)
            offer_j = chips[sell_j, j].sum() * prices[j]
            offer_l = chips[sell_l, l].sum() * prices[l]
            value = min(offer_j, offer_l)
            if value <= 0:
                continue
            gj, gl = chips[sell_j, j] * (value / offer_j), chips[sell_l, l] * (value / offer_l)
            x[sell_j, j] -= gj
            x[sell_j, l] += gj * prices[j] / prices[l]
            x[sell_l, l] -= gl
            x[sell_l, j] += gl * prices[l] / prices[j]
            traded += value
    x = best_within_cap(s, p.caps, np.clip(x, 0.0, None))
    return Allocation("noncooperative", x, time.perf_counter() - t0,
                      {"prices": prices.tolist(), "traded_value": traded})


# ---------------------------------------------------------------- Pareto check

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


# ---------------------------------------------------------------- Eisenberg-Gale / CEEI

def eisenberg_gale(p: Problem, rel_tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """argmax sum_i w_i log U_i over capacity and caps (Eisenberg-Gale), by adding
    tangent cuts z_i <= log u + (U_i - u)/u of log at the current utilities (HiGHS LPs).

    Every LP maximises sum_i w_i min_cuts(...), a strictly increasing function of U, so
    its solution is Pareto efficient whatever the remaining gap; the gap (z_i - log U_i
    <= rel_tol) only bounds how far it is from the exact CEEI (SI, EF)."""
    n, m = p.n, p.m
    base = np.maximum(equal_share_values(p), 1e-12)
    rows, rhs = block_rows(p)
    fixed = sp.hstack([rows, sp.csr_matrix((rows.shape[0], n))]).tocsr()
    ur = utility_rows(p)
    points = [base * f for f in (0.25, 0.5, 1.0, 2.0, 4.0, 16.0)]
    c = np.concatenate([np.zeros(n * m), -p.weights])
    for _ in range(max_iter):
        u0 = np.concatenate(points)
        idx = np.tile(np.arange(n), len(points))
        # z_i - U_i/u0 <= log u0 - 1
        cut = sp.hstack([-sp.diags(1 / u0) @ ur[idx], sp.csr_matrix(
            (np.ones(len(idx)), (np.arange(len(idx)), idx)), shape=(len(idx), n))])
        z = solve_lp(c, sp.vstack([fixed, cut]).tocsr(), np.concatenate([rhs, np.log(u0) - 1]),
                     bounds=[(0, None)] * (n * m) + [(None, None)] * n, what="Nash welfare LP")
        x = np.clip(z[:n * m].reshape(n, m), 0.0, None)
        u = np.maximum((p.speedup * x).sum(axis=1), 1e-300)
        gap = z[n * m:] - np.log(u)
        if np.all(gap <= rel_tol):
            return x
        points.append(u)
    return x


def ceei(p: Problem) -> Allocation:
    """The weighted competitive equilibrium from equal incomes: the Eisenberg-Gale
    allocation, x_ij = 0 where s_ij = 0 (useless GPUs only feed others' envy). PE, SI and
    EF for linear utilities (Varian 1974); `cooperative`'s last resort."""
    t0 = time.perf_counter()
    x = eisenberg_gale(p)
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


# ---------------------------------------------------------------- cooperative, stages 2-3

def check_fair_pe(p: Problem, x: np.ndarray) -> tuple[float, float, float]:
    """(min SI slack, min EF slack, relative Pareto gain): the verification of stage 3."""
    return float(si_slack(p, x).min()), float(ef_slack(p, x).min()), pareto_improvement(p, x)[0]


def _acceptable(check: tuple[float, float, float]) -> bool:
    si, ef, gain = check
    return si >= -ACCEPT_TOL and ef >= -ACCEPT_TOL and gain <= ACCEPT_TOL


def _cut_prices(p: Problem, x: np.ndarray) -> np.ndarray:
    """lam[i, k]: the cap's dual price in f_i(w_i/w_k x_k), so each EF cut is tight at x."""
    n, s = p.n, p.speedup
    scaled = (p.weights[:, None, None] / p.weights[None, :, None]) * x[None, :, :]
    lam = capped_price(np.broadcast_to(s[:, None, :], scaled.shape), np.broadcast_to(p.caps[:, None], (n, n)),
                       scaled)
    return np.where(np.isfinite(p.caps)[:, None], lam, 0.0)


def _pareto_stages(p: Problem, x: np.ndarray, cuts: np.ndarray, time_limit: float) -> tuple[np.ndarray, dict]:
    """Stages 2 and 3 of `cooperative` on distinct tenants."""
    t0 = time.perf_counter()
    gain, _ = pareto_improvement(p, x)
    info: dict = {"pareto_gain_lp": gain}
    if gain <= PE_TOL:
        return x, info
    ce = ceei(p).x
    ce_check = check_fair_pe(p, ce)
    ce_ok = _acceptable(ce_check)
    info["ceei_check"] = list(ce_check)
    u = np.maximum(utilities(p, ce), 1e-300)
    ratio = float((p.weights / u).max() / (p.weights / u).min())
    # start from stage 1's EF pairs and the pairs tight at the CEEI
    pairs = np.unique(np.concatenate([cuts.reshape(-1, 2), ef_pairs_tight(p, ce)]), axis=0)
    if ce_ok:   # the best point of the CEEI's supporting face: PE, and a bound for the MILP
        face = _best_on_face(p, ce)
        if face is not None and _acceptable(check_fair_pe(p, face)) and efficiency(p, face) > efficiency(p, ce):
            ce = face
    mx, minfo = _pe_milp(p, pairs, efficiency(p, ce) if ce_ok else None, max(WEIGHT_RATIO, 2.0 * ratio),
                         t0 + time_limit)
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
    info["stage"], info["pareto_efficient"] = "lp", False   # never seen in the tests
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
    lam = _cut_prices(p, ce)
    fixed_a = sp.vstack([rows, -utility_rows(p), sp.csr_matrix(-(beta[:, None] * s).ravel()[None, :])]).tocsr()
    fixed_b = np.concatenate([rhs, -base * (1 - TOL), [-top * (1 - 1e-12)]])
    cuts = ef_pairs_tight(p, ce)
    for _ in range(20):
        cut_a, cut_b = _ef_cut_rows(p, cuts, lam)
        res = linprog(-s.ravel(), A_ub=sp.vstack([fixed_a, cut_a]).tocsr(), b_ub=np.concatenate([fixed_b, cut_b]),
                      bounds=(0, None), method="highs", options=HIGHS)
        if res.status != 0:
            return None
        x = np.clip(res.x.reshape(n, m), 0.0, None)
        viol = _ef_violations(p, x, lam, scale)
        new = np.argwhere(viol > TOL * 10)
        if len(new) == 0:
            return x
        cuts = np.unique(np.concatenate([cuts, new]), axis=0)
    return None


def ef_pairs_tight(p: Problem, x: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Pairs (i, k) with EF slack of i towards k at most tol (relative): the binding ones."""
    if p.n < 2:
        return np.zeros((0, 2), dtype=int)
    v = envy_values(p, x)
    np.fill_diagonal(v, -np.inf)
    slack = (utilities(p, x)[:, None] - v) / np.maximum(equal_share_values(p), 1e-12)[:, None]
    return np.argwhere(slack <= tol)


def _pe_milp(p: Problem, pairs: np.ndarray, lower: float | None, ratio: float,
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
        left = deadline - time.perf_counter()
        if left <= 0:
            info["milp_status"] = "time limit"
            return None, info
        cut_a, cut_b, nd = _ef_rows_exact(p, pairs)
        a = sp.vstack([sp.hstack([fixed_a, sp.csr_matrix((fixed_a.shape[0], nd))]), cut_a]).tocsr()
        bb = np.concatenate([fixed_b, cut_b])
        cc, lo = np.concatenate([c, np.zeros(nd)]), np.concatenate([lb, np.zeros(nd)])
        hi = np.concatenate([ub, np.ones(nd)])
        with _stdout_to_stderr():
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


_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _stdout_to_stderr():
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
