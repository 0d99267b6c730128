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
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

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


def elastic_jobs(share: np.ndarray) -> list[tuple[str, int]]:
    """One-GPU units for a tenant without jobs: enough to hold its share of every type."""
    return [(f"unit-{k}", 1) for k in range(int(math.ceil(share.sum() - 1e-9)) + 1)]


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
        job_lists = {t: (jobs.get(t) or elastic_jobs(x[i])) for i, t in enumerate(tenants)}
        bound = 4.0 * max((g for js in job_lists.values() for _, g in js), default=1) + 2.0
        deficit = np.zeros((n, m))
        for i, t in enumerate(tenants):
            tgt, rec = self.target.setdefault(t, {}), self.received.setdefault(t, {})
            for j, g in enumerate(gpu_types):
                d = tgt.get(g, 0.0) + x[i, j] - rec.get(g, 0.0)
                d = min(max(d, -bound), bound + x[i, j])       # clamp the debt either way
                tgt[g] = rec.get(g, 0.0) + d                # cumulative target incl. this round
                deficit[i, j] = d
        free = np.floor(capacity + 1e-9).astype(int)
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
        before = {t: {job: gt for job, (gt, _) in self.placement.get(t, {}).items()} for t in tenants}
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
