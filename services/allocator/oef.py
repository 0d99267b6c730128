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
HiGHS; `noncooperative` is the fixed-price pairwise exchange (strategy-proof, SI, EF).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

TOL = 1e-9  # relative tolerance of the LPs and of the cut generation
CUTS_PER_TENANT = 3  # EF rows added per tenant and LP round
HIGHS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


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


def cooperative(p: Problem, max_refine: int = 4) -> Allocation:
    """max sum_i U_i s.t. capacity, caps, SI and weighted EF (HiGHS LPs).

    Interchangeable tenants (same speedups, same cap per weight) are merged into one
    of their total weight and cap: the LP is convex and symmetric in them, so it has
    an optimum giving them equal bundles per unit of weight, where EF among them
    holds with equality. The group's bundle is split in proportion to weight.
    """
    t0 = time.perf_counter()
    group, first = _groups(p)
    if len(first) == p.n:
        return _cooperative(p, max_refine, t0)
    wsum = np.bincount(group, weights=p.weights)
    q = Problem(p.gpu_types, p.capacity, tuple(p.tenants[i] for i in first), wsum, p.throughput[first],
                p.caps[first] / p.weights[first] * wsum, p.prices)
    agg = _cooperative(q, max_refine, t0)
    x = agg.x[group] * (p.weights / wsum[group])[:, None]
    return Allocation("cooperative", x, time.perf_counter() - t0, {**agg.info, "groups": len(first)})


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
                      {"lp_solves": lp_solves, "ef_cuts": int(len(cuts)), "refinements": refines})


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
    z = solve_lp(c, sp.vstack([rows, improve]).tocsr(), np.concatenate([rhs, -u]), what="Pareto LP")
    return float(z[n * m:].sum() / max(u.sum(), 1e-12)), np.clip(z[:n * m].reshape(n, m), 0.0, None)
