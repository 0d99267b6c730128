"""The `hetis.v1.Allocator` servicer: validated state changes into Redis, a debounced
recomputation of the fractional allocation, and a round loop that grants integer GPUs."""
from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from hetis.v1 import allocator_pb2 as pb
from hetis.v1 import allocator_pb2_grpc

from . import oef
from .modes import MODES, allocate
from .rounds import RoundResult, Rounds
from .spec import SpecError, build_problem, parse_inventory, parse_prices, parse_tenant
from .store import Store

log = logging.getLogger("hetis.allocator")

SOLVE = Histogram("hetis_allocator_solve_seconds", "Time to compute an allocation", ["mode"])
TENANTS = Gauge("hetis_allocator_tenants", "Tenants known to the allocator")
EFFICIENCY = Gauge("hetis_allocator_efficiency", "Sum of utilities of the current allocation")
ROUNDS = Counter("hetis_allocator_rounds_total", "Rounds granted")
MOVES = Counter("hetis_allocator_moves_total", "Jobs that changed GPU type or were preempted")
RECOMPUTES = Counter("hetis_allocator_recomputes_total", "Recomputations of the allocation")


class Snapshot:
    """The state at one version and its allocation in the service's mode."""

    def __init__(self, version: int, gpus: dict, prices: dict, tenants: list, mode: str):
        self.version, self.gpus, self.mode = version, gpus, mode
        self.excluded = [t.name for t in tenants if not any(t.throughput.get(g, 0) > 0 for g in gpus)]
        self.tenants = [t for t in tenants if t.name not in self.excluded]
        self.jobs = {t.name: t.jobs for t in self.tenants}
        self.problem = (build_problem(gpus, self.tenants, {g: prices[g] for g in gpus if g in prices} or None)
                        if gpus and self.tenants else None)
        self.alloc = self.solve(mode) if self.problem else None

    def solve(self, mode: str) -> oef.Allocation | None:
        if self.problem is None:
            return None
        with SOLVE.labels(mode).time():
            return allocate(self.problem, mode)


class Allocator(allocator_pb2_grpc.AllocatorServicer):
    def __init__(self, store: Store, mode: str = "cooperative", round_seconds: float = 60.0,
                 debounce_seconds: float = 0.5):
        self.store, self.mode = store, mode
        self.round_seconds, self.debounce = round_seconds, debounce_seconds
        self.lock = threading.RLock()
        self.new_round = threading.Condition()
        self.changed = threading.Event()
        self.stopping = threading.Event()
        saved = store.load_json("rounds")
        self.rounds = Rounds.from_dict(saved) if saved else Rounds(round_seconds)
        self.rounds.round_seconds = round_seconds
        self.latest: RoundResult | None = None
        self.snap = self._refresh()
        self.threads = [threading.Thread(target=f, name=f"allocator-{f.__name__}", daemon=True)
                        for f in (self._recompute_loop, self._round_loop)]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------ state
    def _refresh(self) -> Snapshot:
        with self.lock:
            gpus, prices = self.store.inventory()
            tenants = self.store.tenants()
            snap = Snapshot(self.store.version(), gpus, prices, tenants, self.mode)
            self.snap = snap
            RECOMPUTES.inc()
            TENANTS.set(len(tenants))
            if snap.alloc is not None:
                EFFICIENCY.set(oef.efficiency(snap.problem, snap.alloc.x))
                self.store.save_json("allocation", {
                    "mode": snap.mode, "version": snap.version, "tenants": list(snap.problem.tenants),
                    "gpu_types": list(snap.problem.gpu_types), "x": snap.alloc.x.tolist(),
                    "solve_seconds": snap.alloc.solve_seconds, "stage": snap.alloc.info.get("stage")})
            log.info("allocation v%d: %d tenants, mode %s%s", snap.version, len(tenants), self.mode,
                     f" (stage {snap.alloc.info['stage']})" if snap.alloc is not None and "stage" in snap.alloc.info
                     else "")
            return snap

    def _current(self) -> Snapshot:
        """The snapshot, recomputed first if the stored state is newer (read your writes)."""
        with self.lock:
            return self.snap if self.snap.version == self.store.version() else self._refresh()

    def _recompute_loop(self) -> None:
        while not self.stopping.is_set():
            if not self.changed.wait(0.5):
                continue
            while True:                      # debounce: wait until changes stop arriving
                self.changed.clear()
                if self.stopping.wait(self.debounce) or not self.changed.is_set():
                    break
            if not self.stopping.is_set():
                try:
                    self._current()
                except Exception:
                    log.exception("recomputation failed")

    def _round_loop(self) -> None:
        while not self.stopping.wait(0 if self.latest is None else self.round_seconds):
            try:
                self.run_round()
            except Exception:
                log.exception("round failed")

    def run_round(self) -> RoundResult | None:
        with self.lock:
            snap = self._current()
            if snap.alloc is None:
                return None
            p = snap.problem
            res = self.rounds.step(list(p.tenants), list(p.gpu_types), p.capacity, snap.alloc.x,
                                   snap.jobs, time.time())
            self.store.save_json("rounds", self.rounds.to_dict())
        ROUNDS.inc()
        MOVES.inc(res.moves)
        with self.new_round:
            self.latest = res
            self.new_round.notify_all()
        return res

    def close(self) -> None:
        self.stopping.set()
        with self.new_round:
            self.new_round.notify_all()
        for t in self.threads:
            t.join(timeout=5)
        self.store.close()

    # ------------------------------------------------------------ RPCs
    def SetInventory(self, request, context):
        try:
            gpus = parse_inventory(dict(request.gpus), "gpus")
            prices = parse_prices(dict(request.prices), list(gpus), "prices")
        except SpecError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        version = self.store.set_inventory(gpus, prices)
        self.changed.set()
        return pb.SetInventoryResponse(version=version)

    def UpsertTenant(self, request, context):
        if not request.HasField("tenant"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tenant: required")
        t = request.tenant
        if t.weight < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tenant.weight: must be > 0, got {t.weight}")
        d = {"name": t.name, "weight": t.weight or None, "throughput": dict(t.throughput),
             "job_type": t.job_type, "scale_factor": t.scale_factor,
             "max_gpus": t.max_gpus if t.HasField("max_gpus") else None,
             "jobs": [{"id": j.id, "gpus": j.gpus} for j in t.jobs]}
        try:
            spec = parse_tenant(d, "tenant")
        except SpecError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        version, created = self.store.upsert_tenant(spec)
        self.changed.set()
        return pb.UpsertTenantResponse(version=version, created=created)

    def RemoveTenant(self, request, context):
        if not request.name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        version = self.store.remove_tenant(request.name)
        if version is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"name: no tenant {request.name!r}")
        self.changed.set()
        return pb.RemoveTenantResponse(version=version)

    def _solve(self, mode: str, context) -> tuple[Snapshot, oef.Allocation | None]:
        if mode and mode not in MODES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"mode: unknown {mode!r} (known: {', '.join(MODES)})")
        snap = self._current()
        if not mode or mode == snap.mode:
            return snap, snap.alloc
        return snap, snap.solve(mode)

    def GetAllocation(self, request, context):
        snap, alloc = self._solve(request.mode, context)
        out = pb.Allocation(mode=request.mode or snap.mode, version=snap.version, inventory=snap.gpus)
        if alloc is None:
            return out
        p = snap.problem
        u, si, ef = oef.utilities(p, alloc.x), oef.si_slack(p, alloc.x), oef.ef_slack(p, alloc.x)
        for i, name in enumerate(p.tenants):
            out.tenants.add(tenant=name, gpus=dict(zip(p.gpu_types, map(float, alloc.x[i]))),
                            utility=float(u[i]), sharing_incentive=bool(si[i] >= -1e-6),
                            envy_free=bool(ef[i] >= -1e-6))
        out.efficiency, out.solve_seconds = float(u.sum()), alloc.solve_seconds
        return out

    def Explain(self, request, context):
        snap, alloc = self._solve(request.mode, context)
        out = pb.ExplainResponse(mode=request.mode or snap.mode, version=snap.version)
        names = list(snap.problem.tenants) if snap.problem else []
        for t in request.tenants:
            if t not in names:
                context.abort(grpc.StatusCode.NOT_FOUND, f"tenants: no tenant {t!r}" +
                              (" with a positive throughput on the inventory" if t in snap.excluded else ""))
        if alloc is None:
            return out
        p, x = snap.problem, alloc.x
        u, base = oef.utilities(p, x), oef.equal_share_values(p)
        si, ef, envied = oef.si_slack(p, x), oef.ef_slack(p, x), oef.most_envied(p, x)
        want = set(request.tenants) or set(names)
        for i, name in enumerate(names):
            if name in want:
                out.tenants.add(tenant=name, utility=float(u[i]), equal_share_utility=float(base[i]),
                                si_slack=float(si[i]), ef_slack=float(ef[i]), most_envied=envied[i],
                                speedup=dict(zip(p.gpu_types, map(float, p.speedup[i]))),
                                gpus=dict(zip(p.gpu_types, map(float, x[i]))))
        out.efficiency = float(u.sum())
        return out

    def WatchAllocation(self, request, context):
        seen = 0
        while context.is_active() and not self.stopping.is_set():
            with self.new_round:
                self.new_round.wait_for(lambda: (self.latest is not None and self.latest.round > seen)
                                        or self.stopping.is_set(), timeout=1.0)
                res = self.latest
            if res is None or res.round <= seen:
                continue
            seen = res.round
            yield round_message(res, self.snap)


def round_message(res: RoundResult, snap: Snapshot) -> pb.Round:
    msg = pb.Round(round=res.round, started_unix=res.started, version=snap.version, mode=snap.mode,
                   moves=res.moves)
    for g in res.grants:
        msg.grants.add(tenant=g.tenant, job_id=g.job_id, gpu_type=g.gpu_type, gpus=g.gpus,
                       lease_expires_unix=g.lease_expires, extended=g.extended)
    for t, counts in res.per_tenant.items():
        msg.tenants.add(tenant=t, gpus=counts, received=res.received[t], target=res.target[t])
    return msg
