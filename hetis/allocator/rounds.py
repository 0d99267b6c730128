"""Rounds: a fractional allocation becomes integer GPU grants, one round at a time.

Each round every job (a tenant's unit of work needing g GPUs of one type at once)
runs on one GPU type or waits. For every tenant i and type j the scheduler keeps
the cumulative target T_ij (the sum of x_ij over the rounds so far) and what was
received R_ij; the round serves the largest deficits T_ij - R_ij first, placing a
job of g GPUs only while the deficit is at least g/2, so |T_ij - R_ij| stays within
a few jobs' sizes and the mean grant converges to x_ij. Among a tenant's jobs that
fit, the one already on the type is chosen first (stickiness): it keeps its GPUs,
its lease is extended, and nothing moves while the targets are met. Tenants without jobs are
elastic: units of one GPU. Deficits are clamped so a change of allocation does not
leave an unbounded debt.

With multi-GPU jobs the greedy fragments the pool (an 8-GPU job waits for 8 free GPUs
while small jobs hold them; in a full pool every idle GPU-round is lost for good), so
a round with any job of more than one GPU is packed by a small MILP instead (`pack`):
it chooses how many jobs of each (tenant, size) run on each type to minimise
sum_ij (D_ij - G_ij)^2 / max(x_ij, 1), the deficits left after the round (D before
it, G granted), normalised so that a tenant with a small share is not the one that
absorbs every round's fragmentation. The square is exact at integers as a sum of
unit increments of weight (D - k + 1/2) / max(x, 1), concave, so the LP relaxation
takes them in order. A job that stays on its type earns a small bonus (no move).
This reaches any x that is a mix of feasible integer rounds (tested); an x outside
that hull (e.g. a tenant whose 7 GPUs of jobs must all run on a type that another
tenant's 8-GPU job needs a quarter of the time) cannot be reached by any schedule;
given the jobs, cooperative keeps x within that hull (jobs.py; docs/allocator.md, Rounds).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from .lp import stdout_to_stderr

Jobs = dict[str, list[tuple[str, int]]]   # tenant -> [(job id, gpus)]


@dataclass
class Grant:
    tenant: str
    job_id: str
    gpu_type: str
    gpus: int
    lease_expires: float
    extended: bool


@dataclass
class RoundResult:
    round: int
    started: float
    grants: list[Grant]
    moves: int
    per_tenant: dict[str, dict[str, int]]      # GPUs granted this round
    received: dict[str, dict[str, float]]      # mean GPUs per round so far
    target: dict[str, dict[str, float]]        # the fractional share used


PACK_SECONDS = 1.0   # time limit of a round's MILP; without a solution by then, the greedy's grants
STAY_BONUS = 1e-3    # per GPU of a job kept on its type (ties go to no move)


def elastic_jobs(share: np.ndarray, deficit: np.ndarray | None = None) -> list[tuple[str, int]]:
    """One-GPU units for a tenant without jobs: enough to hold its share of every type
    (and, in a packed round, what it is owed)."""
    want = share.sum() if deficit is None else max(share.sum(), np.clip(deficit, 0.0, None).sum())
    return [(f"unit-{k}", 1) for k in range(int(math.ceil(want - 1e-9)) + 1)]


@dataclass
class Rounds:
    round_seconds: float = 60.0
    round: int = 0
    target: dict[str, dict[str, float]] = field(default_factory=dict)    # cumulative
    received: dict[str, dict[str, float]] = field(default_factory=dict)  # cumulative
    present: dict[str, int] = field(default_factory=dict)                # rounds seen
    placement: dict[str, dict[str, list]] = field(default_factory=dict)  # tenant -> job -> [type, lease]

    def step(self, tenants: list[str], gpu_types: list[str], capacity: np.ndarray, x: np.ndarray,
             jobs: Jobs, now: float) -> RoundResult:
        """Grant one round for fractional allocation x (tenants x gpu_types)."""
        n, m = len(tenants), len(gpu_types)
        for gone in set(self.target) - set(tenants):
            for d in (self.target, self.received, self.present, self.placement):
                d.pop(gone, None)
        bound = 4.0 * max((g for js in jobs.values() for _, g in js), default=1) + 2.0
        deficit = np.zeros((n, m))
        for i, t in enumerate(tenants):
            tgt, rec = self.target.setdefault(t, {}), self.received.setdefault(t, {})
            for j, g in enumerate(gpu_types):
                d = tgt.get(g, 0.0) + x[i, j] - rec.get(g, 0.0)
                d = min(max(d, -bound), bound + x[i, j])       # clamp the debt either way
                tgt[g] = rec.get(g, 0.0) + d                # cumulative target incl. this round
                deficit[i, j] = d
        multi = any(g > 1 for t in tenants for _, g in jobs.get(t) or ())
        job_lists = {t: (jobs.get(t) or elastic_jobs(x[i], deficit[i] if multi else None))
                     for i, t in enumerate(tenants)}
        free = np.floor(capacity + 1e-9).astype(int)
        before = {t: {job: gt for job, (gt, _) in self.placement.get(t, {}).items()} for t in tenants}
        placed = pack(tenants, gpu_types, free, deficit, x, job_lists, before) if multi else None
        if placed is None:
            placed = greedy(tenants, gpu_types, free, deficit, job_lists, before)
        return self._record(tenants, gpu_types, x, job_lists, placed, now)

    def _record(self, tenants, gpu_types, x, job_lists, placed, now) -> RoundResult:
        self.round += 1
        grants, moves = [], 0
        lease = now + self.round_seconds
        per_tenant = {}
        for i, t in enumerate(tenants):
            sizes = dict(job_lists[t])
            before = self.placement.get(t, {})
            moves += sum(1 for job, (g, _) in before.items() if placed[t].get(job) != g)
            counts = {g: 0 for g in gpu_types}
            for job, g in placed[t].items():
                grants.append(Grant(t, job, g, sizes[job], lease, before.get(job, [None])[0] == g))
                counts[g] += sizes[job]
            per_tenant[t] = counts
            rec = self.received[t]
            for g in gpu_types:
                rec[g] = rec.get(g, 0.0) + counts[g]
            self.placement[t] = {job: [g, lease] for job, g in placed[t].items()}
            self.present[t] = self.present.get(t, 0) + 1
        received = {t: {g: v / self.present[t] for g, v in self.received[t].items()} for t in tenants}
        target = {t: dict(zip(gpu_types, map(float, x[i]))) for i, t in enumerate(tenants)}
        return RoundResult(self.round, now, grants, moves, per_tenant, received, target)

    def to_dict(self) -> dict:
        return {"round_seconds": self.round_seconds, "round": self.round, "target": self.target,
                "received": self.received, "present": self.present, "placement": self.placement}

    @classmethod
    def from_dict(cls, d: dict) -> "Rounds":
        return cls(**d)


def greedy(tenants, gpu_types, free, deficit, job_lists, before) -> dict[str, dict[str, str]]:
    """Jobs of one GPU: the largest deficits first (tenant -> job -> type)."""
    n, m = deficit.shape
    deficit, free = deficit.copy(), free.copy()
    unplaced = {t: dict(js) for t, js in job_lists.items()}
    placed: dict[str, dict[str, str]] = {t: {} for t in tenants}

    def place(i: int, j: int, job: str) -> None:
        t = tenants[i]
        g = unplaced[t].pop(job)
        free[j] -= g
        deficit[i, j] -= g
        placed[t][job] = gpu_types[j]

    # the largest deficits first; on each, the job already there if it fits, else the
    # largest job that fits without overshooting the deficit by more than g/2;
    for slack in (2.0, math.inf):   # then backfill: any job fits while its tenant is owed
        heap = [(-deficit[i, j], i, j) for i in range(n) for j in range(m) if deficit[i, j] > 0]
        heapq.heapify(heap)
        while heap:
            neg, i, j = heapq.heappop(heap)
            if -neg != deficit[i, j]:
                continue
            t = tenants[i]
            fits = [(before[t].get(job) == gpu_types[j], g, job) for job, g in unplaced[t].items()
                    if g <= free[j] and g <= slack * deficit[i, j]]
            if not fits:
                continue
            place(i, j, max(fits)[2])
            if deficit[i, j] > 0:
                heapq.heappush(heap, (-deficit[i, j], i, j))
    return placed


def pack(tenants, gpu_types, free, deficit, x, job_lists, before) -> dict[str, dict[str, str]] | None:
    """A round with multi-GPU jobs as a MILP (module docstring): None if HiGHS finds no
    solution within PACK_SECONDS. Variables: n_v = jobs of (tenant, size) v on type j;
    k_v <= n_v, those of them already on j (the stay bonus); u = unit increments of G_ij,
    at most what the owed GPUs and the largest job allow."""
    m = len(gpu_types)
    rows = []                                   # (i, g, j, jobs of that size, of them on j now)
    for i, t in enumerate(tenants):
        by: dict[int, list[str]] = {}
        for job, g in job_lists[t]:
            by.setdefault(g, []).append(job)
        for g, js in by.items():
            for j in np.flatnonzero((x[i] > 0) | (deficit[i] > 0)):
                rows.append((i, g, j, len(js), sum(before[t].get(job) == gpu_types[j] for job in js)))
    placed: dict[str, dict[str, str]] = {t: {} for t in tenants}
    if not rows:
        return placed
    vi, vg, vj, cnt, stay = map(np.array, zip(*rows))
    nv = len(rows)
    cell, cell_of = np.unique(vi * m + vj, return_inverse=True)           # (i, j) cells with a variable
    most = np.bincount(cell_of, weights=vg * cnt)                        # GPUs the cell's jobs could take
    big = np.zeros(len(cell))
    np.maximum.at(big, cell_of, vg)
    ci, cj = np.divmod(cell, m)
    room = np.minimum(np.minimum(free[cj], most), np.ceil(np.clip(deficit[ci, cj], 0.0, None)) + big).astype(int)
    uc = np.repeat(np.arange(len(cell)), room)                           # increment -> cell
    uk = np.arange(len(uc)) - np.repeat(np.cumsum(room) - room, room) + 1  # k = 1, 2, ... per cell
    norm = np.maximum(x[ci, cj], 1.0)
    nu = len(uc)
    cost = -np.concatenate([np.zeros(nv), STAY_BONUS * vg, (deficit[ci, cj][uc] - uk + 0.5) / norm[uc]])
    group, group_of = np.unique(vi * (int(vg.max()) + 1) + vg, return_inverse=True)
    per_group = np.zeros(len(group))
    per_group[group_of] = cnt
    ar = np.arange(nv)
    a_ub = sp.vstack([sp.csr_matrix((np.ones(nv), (group_of, ar)), shape=(len(group), 2 * nv + nu)),  # jobs
                      sp.csr_matrix((vg.astype(float), (vj, ar)), shape=(m, 2 * nv + nu)),           # capacity
                      sp.hstack([-sp.eye(nv), sp.eye(nv), sp.csr_matrix((nv, nu))])]).tocsr()      # k <= n
    a_eq = sp.csr_matrix((np.concatenate([vg.astype(float), -np.ones(nu)]),       # sum g n = sum u per cell
                          (np.concatenate([cell_of, uc]), np.concatenate([ar, 2 * nv + np.arange(nu)]))),
                         shape=(len(cell), 2 * nv + nu))
    with stdout_to_stderr():     # HiGHS's MIP solver may printf a debug line (lp.py)
        res = milp(cost, integrality=np.ones(2 * nv + nu),
                   bounds=Bounds(0, np.concatenate([cnt, stay, np.ones(nu)]).astype(float)),
                   constraints=[LinearConstraint(a_ub, -np.inf, np.concatenate([per_group, free, np.zeros(nv)])),
                                LinearConstraint(a_eq, 0, 0)],
                   options={"time_limit": PACK_SECONDS})
    if res.x is None:
        return None
    for (i, g, j, _, _), k in zip(rows, np.round(res.x[:nv]).astype(int)):
        if k:      # which of the tenant's jobs of that size: those already on j first
            t = tenants[i]
            pool = sorted((job for job, size in job_lists[t] if size == g and job not in placed[t]),
                          key=lambda job: before[t].get(job) != gpu_types[j])
            for job in pool[:k]:
                placed[t][job] = gpu_types[j]
    return placed
