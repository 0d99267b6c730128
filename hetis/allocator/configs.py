"""Configurations for jobs.py: a configuration is one feasible round of the tenants with
multi-GPU jobs (J), a (|J|, m) array of the GPUs each runs on each type, its jobs placed
whole within the capacity. Here: adding them as LP columns, seeding them (one type at a
time, simulated rounds towards a target) and pricing them (greedy, then a HiGHS MILP
that proves none of negative reduced cost is left).
"""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from .lp import LP, stdout_to_stderr
from .problem import Problem

PRICE_TOL = 1e-9         # a configuration enters when its reduced cost is below -PRICE_TOL (relative)
PRICE_SECONDS = 1.0      # at most, per pricing MILP


def add_config_cols(lp: LP, configs: list[np.ndarray], link0: int, conv: int) -> None:
    """Each configuration A as a column of ``lp``: -A on the link rows from ``link0`` (one
    per job tenant and type), 1 on the convexity row ``conv``; cost 0. Its reduced cost is
    then sum(y * A) - mu with y the link rows' duals and mu the convexity row's (`price`)."""
    if not configs:
        return
    v = np.stack([a.ravel() for a in configs]).astype(float)        # (configs, links)
    c, r = np.nonzero(v)
    rows = np.concatenate([link0 + r, np.full(len(configs), conv)])
    cols = np.concatenate([c, np.arange(len(configs))])
    vals = np.concatenate([-v[c, r], np.ones(len(configs))])
    lp.add_cols(np.zeros(len(configs)), sp.csc_matrix((vals, (rows, cols)), shape=(lp.rows, len(configs))))


def fresh(configs: list[np.ndarray], seen: set) -> list[np.ndarray]:
    """The configurations not in ``seen`` (nor repeated among themselves), now added to it."""
    out = []
    for a in configs:
        key = a.tobytes()
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


def seed_configs(p: Problem, J: np.ndarray, sizes: dict[int, dict[int, int]]) -> list[np.ndarray]:
    """One configuration per job tenant and type: as many of its jobs as fit there,
    largest first (each is feasible on its own; the LP mixes them)."""
    out = []
    for r, i in enumerate(J):
        for j in range(p.m):
            if p.throughput[i, j] <= 0:
                continue
            a = np.zeros((len(J), p.m))
            room = p.capacity[j]
            for g in sorted(sizes[i], reverse=True):
                k = int(min(sizes[i][g], room // g))
                a[r, j] += k * g
                room -= k * g
            if a.any():
                out.append(a)
    return out


def round_seeds(p: Problem, J: np.ndarray, sizes: dict[int, dict[int, int]], target: np.ndarray,
                 rounds: int = 128, deadline: float = math.inf) -> list[np.ndarray]:
    """The configurations of ``rounds`` simulated rounds towards ``target`` (|J|, m) GPUs:
    each round places jobs where the cumulative deficit is largest (at least half a job),
    largest jobs first, as the rounds scheduler does. Their mix is near ``target``, so
    column generation starts close and needs few pricing steps (128 rounds: 0.26 s for
    the check at 300 tenants x 8 types with 78 job tenants, against 10 s from the
    one-type seeds alone). Fewer rounds if the deadline comes first."""
    got = np.zeros_like(target)
    m = p.m
    out = []
    jobs = [sorted(((g, c) for g, c in sizes[i].items() if g > 0), reverse=True) for i in J]
    for k in range(1, rounds + 1):
        if time.perf_counter() > deadline:
            break
        deficit = k * target - got
        room = p.capacity.astype(float).copy()
        left = [dict(js) for js in jobs]
        a = np.zeros_like(target)
        order = np.argsort(-deficit, axis=None, kind="stable")
        for flat in order.tolist():
            r, j = divmod(flat, m)
            if deficit[r, j] <= 0:
                break
            for g, _ in jobs[r]:
                while left[r][g] and room[j] >= g and deficit[r, j] >= g / 2:
                    a[r, j] += g
                    room[j] -= g
                    deficit[r, j] -= g
                    left[r][g] -= 1
        got += a
        if a.any():
            out.append(a)
    return fresh(out, set())


def price(p: Problem, J: np.ndarray, sizes: dict[int, dict[int, int]], y: np.ndarray, mu: float,
           deadline: float) -> tuple[np.ndarray | None, bool]:
    """The configuration of least reduced cost sum(y * A) - mu if it is negative, else None;
    and whether the MILP proved it optimal (the LP optimum over all configurations)."""
    scale = max(1.0, float(np.abs(y).max(initial=0.0)), abs(mu))
    var = [(r, g, j, c) for r, i in enumerate(J) for g, c in sizes[i].items() for j in range(p.m)
           if y[r, j] * g < -PRICE_TOL * scale and g <= p.capacity[j] and p.throughput[i, j] > 0]
    if not var:
        return None, True
    vr, vg, vj, vc = map(np.array, zip(*var))
    cost = y[vr, vj] * vg
    key, key_of = np.unique(vr * (int(vg.max()) + 1) + vg, return_inverse=True)
    per_key = np.zeros(len(key))
    per_key[key_of] = vc
    nv = len(var)
    a = sp.vstack([sp.csr_matrix((np.ones(nv), (key_of, np.arange(nv))), shape=(len(key), nv)),
                   sp.csr_matrix((vg.astype(float), (vj, np.arange(nv))), shape=(p.m, nv))]).tocsr()
    limit = max(0.05, min(PRICE_SECONDS, deadline - time.perf_counter()))
    with stdout_to_stderr():
        res = milp(cost, integrality=np.ones(nv), bounds=Bounds(0, vc.astype(float)),
                   constraints=[LinearConstraint(a, -np.inf, np.concatenate([per_key, p.capacity]))],
                   options={"time_limit": limit})
    if res.x is None:
        return None, False
    k = np.round(res.x)
    proved = res.status == 0
    if float(cost @ k) - mu >= -PRICE_TOL * scale:
        return None, proved
    out = np.zeros((len(J), p.m))
    np.add.at(out, (vr, vj), vg * k)
    return out, proved


def price_greedy(p: Problem, J: np.ndarray, sizes: dict[int, dict[int, int]], y: np.ndarray,
                  mu: float) -> np.ndarray | None:
    """A configuration of negative reduced cost sum(y * A) - mu by packing greedily (jobs
    in order of their best value per GPU, each on its best type with room), or None if
    the greedy one is not negative: tried before the MILP of `price`, which is then
    needed only to prove that none is left."""
    scale = max(1.0, float(np.abs(y).max(initial=0.0)), abs(mu))
    r, j = np.nonzero(y < -PRICE_TOL * scale)
    if not len(r):
        return None
    order = np.argsort(y[r, j], kind="stable")
    room = p.capacity.astype(float).copy()
    left = [{g: c for g, c in sorted(sizes[i].items(), reverse=True) if g > 0} for i in J]
    out = np.zeros((len(J), p.m))
    for a, t in zip(r[order].tolist(), j[order].tolist()):
        if p.throughput[J[a], t] <= 0:
            continue
        for g, c in left[a].items():
            k = int(min(c, room[t] // g))
            if k:
                out[a, t] += k * g
                room[t] -= k * g
                left[a][g] -= k
    if float((y * out).sum()) - mu >= -PRICE_TOL * scale:
        return None
    return out


def per_type(a: np.ndarray) -> list[np.ndarray]:
    """The parts of configuration ``a`` on one type each (feasible: fewer jobs): cheap
    extra columns that let the LP use a priced round type by type."""
    used = np.flatnonzero(a.any(axis=0))
    if len(used) < 2:
        return []
    out = []
    for j in used:
        b = np.zeros_like(a)
        b[:, j] = a[:, j]
        out.append(b)
    return out
