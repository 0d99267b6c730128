"""The allocation problem and how a tenant values a bundle (docs/allocator.md).

Definitions (papers/oef.md, extended to demand caps):
- speedup s_ij = T_ij / min_{j: T_ij > 0} T_ij; allocation x_ij >= 0 (GPUs, fractional
  = time share over rounds); efficiency = sum_i U_i.
- f_i(a) = value to tenant i of bundle a: the best d_i GPUs of a (d_i = demand cap, inf
  if none): f_i(a) = max { s_i.y : 0 <= y <= a, sum y <= d_i }. Its own allocation never
  exceeds d_i, so U_i = f_i(x_i) = s_i.x_i.
- equal share e_i = w_i / sum(w) * c; SI: U_i >= f_i(e_i) (the *capped* equal share).
- weighted EF: U_i >= f_i(w_i / w_k * x_k) for every k (a tenant of weight w is w
  identical tenants of weight 1, each with cap d_i / w_i).

Everything here is closed-form numpy, no solver: the `Problem` every mode takes, the
`Allocation` it returns, f_i and the dual price of its cap, and the SI and EF slacks
that results are judged by (the CLI, Explain and the tests read the same numbers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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


FAIR_TOL = 1e-6   # an SI or EF slack >= -FAIR_TOL counts as held (CLI, GetAllocation, Explain)

# cooperative's info["stage"] -> what the CLI and the service report
STAGES = {"lp": "fair_optimum", "milp": "pareto_refinement", "ceei": "pareto_refinement", "fallback": "fallback"}


@dataclass
class Allocation:
    mode: str
    x: np.ndarray                   # (n, m) GPUs per tenant and type
    solve_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def as_dict(self, p: Problem, digits: int = 6) -> dict[str, dict[str, float]]:
        return {t: {g: round(float(v), digits) for g, v in zip(p.gpu_types, row)}
                for t, row in zip(p.tenants, self.x)}

    def outcome(self) -> dict:
        """Which stage produced x: ``stage`` fair_optimum, pareto_refinement or fallback
        (cooperative; "exact" for the other modes, each computed to its own definition),
        ``solver`` (lp, milp, ceei, fpx, colgen: jobs.py; else the mode), ``optimality_gap`` (relative: how
        far the efficiency may be below the SI+EF optimum; None if unknown or not
        applicable), ``pareto_efficient`` (None if not checked), and with multi-GPU jobs
        ``implementable`` (x is a mix of feasible rounds: True; the job-blind x: False;
        None without such jobs) and ``si_fraction`` (the common fraction t of the
        equal-share utility guaranteed; 1 is SI; None without such jobs; jobs.py)."""
        info = self.info
        jobs = {"implementable": info.get("implementable"), "si_fraction": info.get("si_fraction")}
        if self.mode != "cooperative" or "stage" not in info:
            return {"stage": "exact", "solver": self.mode, "optimality_gap": None, "pareto_efficient": None, **jobs}
        pe = info.get("pareto_efficient", True if "pareto_gain_lp" in info else None)
        gap = info.get("gap")
        solver = "fpx" if info["stage"] == "fallback" else info.get("solver", info["stage"])
        return {"stage": STAGES[info["stage"]], "solver": solver,
                "optimality_gap": None if gap is None else float(gap), "pareto_efficient": pe, **jobs}


def groups(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Tenants with the same speedup vector and cap per unit of weight are interchangeable
    (cooperative's LP and the Nash welfare are symmetric in them): (group index per
    tenant, first member per group)."""
    key = np.concatenate([p.speedup, (p.caps / p.weights)[:, None]], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return inverse.ravel(), first


def merged(p: Problem) -> tuple[Problem, np.ndarray]:
    """The problem with each group of interchangeable tenants as one tenant of their total
    weight and cap, and the group of every tenant; a group's bundle is shared in
    proportion to weight (`x[group] * (w / W[group])`)."""
    group, first = groups(p)
    wsum = np.bincount(group, weights=p.weights)
    q = Problem(p.gpu_types, p.capacity, tuple(p.tenants[i] for i in first), wsum, p.throughput[first],
                p.caps[first] / p.weights[first] * wsum, p.prices)
    return q, group


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
    s = p.speedup
    v = p.weights[:, None] * (s @ (x / p.weights[:, None]).T)       # no cap: f_i is linear, one product
    rows = np.flatnonzero(np.isfinite(p.caps))                        # capped tenants: the best d_i GPUs
    if len(rows):
        scaled = (p.weights[rows, None, None] / p.weights[None, :, None]) * x[None, :, :]
        v[rows] = capped_value(np.broadcast_to(s[rows, None, :], scaled.shape),
                               np.broadcast_to(p.caps[rows, None], scaled.shape[:2]), scaled)
    return v


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


def ef_pairs_tight(p: Problem, x: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Pairs (i, k) with EF slack of i towards k at most tol (relative): the binding ones."""
    if p.n < 2:
        return np.zeros((0, 2), dtype=int)
    v = envy_values(p, x)
    np.fill_diagonal(v, -np.inf)
    slack = (utilities(p, x)[:, None] - v) / np.maximum(equal_share_values(p), 1e-12)[:, None]
    return np.argwhere(slack <= tol)


def efficiency(p: Problem, x: np.ndarray) -> float:
    return float(utilities(p, x).sum())
