"""The running allocator: state in Redis, a debounced recomputation of the fractional
allocation, and a round loop that turns it into integer grants. No gRPC here:
services/allocator's servicer converts messages with wire.py and calls these methods.

- Every change (inventory, tenant) is written to the store, which bumps the version
  (store.py), and sets `changed`. The recompute thread waits until changes have been
  quiet for `debounce_seconds`, then rebuilds the `Snapshot`: the problem at that
  version and its allocation in the configured mode.
- Reads go through `current()`, which rebuilds first if the stored version is newer:
  a client reads its own writes without waiting for the debounce.
- A rebuild in mode cooperative starts from the previous solution's EF rows (its
  ``info["warm"]``): after a small change the LP needs a re-solve or two, not the
  whole cutting-plane loop; every solve keeps to `time_limit` seconds.
- The round thread runs `run_round` every `round_seconds`: one `Rounds.step` on the
  current snapshot, the rounds state saved to the store (a restarted allocator
  carries on the round counter and received totals), the result handed to waiting
  streams (`wait_round`). While there is no allocation it sleeps until there is one.
`lock` (re-entrant) serialises rebuilds and rounds and guards `latest` (taken before
`new_round`, which wakes the streams); a stream that is slower than the rounds gets
the latest round and skips the ones in between, so it never falls behind.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from hetis.defaults import ALLOCATOR_METRICS_PORT, ALLOCATOR_PORT, default_redis_url

from .modes import MODES, allocate
from .problem import Allocation, efficiency
from .rounds import RoundResult, Rounds
from .spec import SpecError, TenantSpec, build_problem
from .store import PREFIX, Store

log = logging.getLogger("hetis.allocator")

SOLVE = Histogram("hetis_allocator_solve_seconds", "Time to compute an allocation", ["mode"])
TENANTS = Gauge("hetis_allocator_tenants", "Tenants known to the allocator")
EFFICIENCY = Gauge("hetis_allocator_efficiency", "Sum of utilities of the current allocation")
ROUNDS = Counter("hetis_allocator_rounds_total", "Rounds granted")
MOVES = Counter("hetis_allocator_moves_total", "Jobs that changed GPU type or were preempted")
RECOMPUTES = Counter("hetis_allocator_recomputes_total", "Recomputations of the allocation")


@dataclass
class AllocatorConfig:
    """How the allocator service runs: one field per flag of `python -m services.allocator`."""
    port: int = ALLOCATOR_PORT
    redis_url: str = field(default_factory=default_redis_url)
    redis_prefix: str = PREFIX
    mode: str = "cooperative"                  # the allocation the rounds follow
    metrics_port: int = ALLOCATOR_METRICS_PORT  # Prometheus; -1 off, 0 any free port
    round_seconds: float = 60.0                # length of a round and of a lease
    debounce_seconds: float = 0.5              # quiet time after a change before recomputing
    time_limit: float = 2.0                    # seconds per cooperative solve, Pareto stages included
    log_level: str = "INFO"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown {self.mode!r} (known: {', '.join(MODES)})")
        if self.round_seconds <= 0 or self.debounce_seconds < 0 or self.time_limit <= 0:
            raise ValueError("round_seconds and time_limit must be > 0 and debounce_seconds >= 0")


class NotFound(LookupError):
    """A named tenant does not exist; the message starts with the field, like SpecError's."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class Snapshot:
    """The state at one version and its allocation in the service's mode. Tenants with
    no positive throughput on the inventory's types are left out (`excluded`)."""

    def __init__(self, version: int, gpus: dict, prices: dict, tenants: list[TenantSpec], mode: str,
                 time_limit: float = 2.0, warm: list | None = None):
        self.version, self.gpus, self.mode, self.time_limit = version, gpus, mode, time_limit
        self.excluded = [t.name for t in tenants if not any(t.throughput.get(g, 0) > 0 for g in gpus)]
        self.tenants = [t for t in tenants if t.name not in self.excluded]
        self.jobs = {t.name: t.jobs for t in self.tenants}
        self.problem = (build_problem(gpus, self.tenants, {g: prices[g] for g in gpus if g in prices} or None)
                        if gpus and self.tenants else None)
        self.alloc = self.solve(mode, warm) if self.problem else None

    def solve(self, mode: str, warm: list | None = None) -> Allocation | None:
        if self.problem is None:
            return None
        with SOLVE.labels(mode).time():
            return allocate(self.problem, mode, self.time_limit, warm, self.jobs)

    def require(self, tenants) -> None:
        """NotFound for the first of ``tenants`` that is not in the problem."""
        names = list(self.problem.tenants) if self.problem else []
        for t in tenants:
            if t not in names:
                raise NotFound("tenants", f"no tenant {t!r}" +
                               (" with a positive throughput on the inventory" if t in self.excluded else ""))


class AllocatorRuntime:
    """Owns the store, the current snapshot, the rounds state and the two threads."""

    def __init__(self, store: Store, cfg: AllocatorConfig):
        self.store, self.mode, self.time_limit = store, cfg.mode, cfg.time_limit
        self.round_seconds, self.debounce = cfg.round_seconds, cfg.debounce_seconds
        self.lock = threading.RLock()
        self.new_round = threading.Condition()
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.allocated = threading.Event()     # set while the snapshot has an allocation
        saved = store.load_json("rounds")
        self.rounds = Rounds.from_dict(saved) if saved else Rounds(cfg.round_seconds)
        self.rounds.round_seconds = cfg.round_seconds
        self.latest: RoundResult | None = None
        self.latest_snap: Snapshot | None = None   # the snapshot `latest` was granted from
        self.snap: Snapshot | None = None
        self.snap = self._refresh()
        self.threads = [threading.Thread(target=f, name=f"allocator-{f.__name__}", daemon=True)
                        for f in (self._recompute_loop, self._round_loop)]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------ changes
    def set_inventory(self, gpus: dict[str, int], prices: dict[str, float] | None) -> int:
        version = self.store.set_inventory(gpus, prices)
        self.changed.set()
        return version

    def upsert_tenant(self, spec: TenantSpec) -> tuple[int, bool]:
        version, created = self.store.upsert_tenant(spec)
        self.changed.set()
        return version, created

    def remove_tenant(self, name: str) -> int:
        version = self.store.remove_tenant(name)
        if version is None:
            raise NotFound("name", f"no tenant {name!r}")
        self.changed.set()
        return version

    # ------------------------------------------------------------ reads
    def current(self) -> Snapshot:
        """The snapshot, recomputed first if the stored state is newer (read your writes)."""
        with self.lock:
            return self.snap if self.snap.version == self.store.version() else self._refresh()

    def solve(self, mode: str = "") -> tuple[Snapshot, Allocation | None]:
        """The current snapshot and its allocation in ``mode`` (empty: the service's mode,
        already computed; another mode is computed on demand)."""
        if mode and mode not in MODES:
            raise SpecError("mode", f"unknown {mode!r} (known: {', '.join(MODES)})")
        snap = self.current()
        if not mode or mode == snap.mode:
            return snap, snap.alloc
        return snap, snap.solve(mode)

    def wait_round(self, seen: int, timeout: float = 1.0) -> RoundResult | None:
        """The latest round if it is newer than round ``seen``, waiting up to ``timeout``."""
        res, _ = self.wait_round_and_snapshot(seen, timeout)
        return res

    def wait_round_and_snapshot(self, seen: int, timeout: float = 1.0) -> tuple[RoundResult | None, Snapshot | None]:
        """`wait_round`, with the snapshot that round was granted from (its version, mode)."""
        with self.new_round:
            self.new_round.wait_for(lambda: (self.latest is not None and self.latest.round > seen)
                                    or self.stopping.is_set(), timeout=timeout)
            res, snap = self.latest, self.latest_snap
        return (res, snap) if res is not None and res.round > seen else (None, None)

    # ------------------------------------------------------------ the loops
    def _refresh(self) -> Snapshot:
        with self.lock:
            gpus, prices = self.store.inventory()
            tenants = self.store.tenants()
            old = self.snap
            warm = old.alloc.info.get("warm") if old is not None and old.alloc is not None else None
            snap = Snapshot(self.store.version(), gpus, prices, tenants, self.mode, self.time_limit, warm)
            self.snap = snap
            (self.allocated.set if snap.alloc is not None else self.allocated.clear)()
            RECOMPUTES.inc()
            TENANTS.set(len(tenants))
            if snap.alloc is not None:
                EFFICIENCY.set(efficiency(snap.problem, snap.alloc.x))
                self.store.save_json("allocation", {
                    "mode": snap.mode, "version": snap.version, "tenants": list(snap.problem.tenants),
                    "gpu_types": list(snap.problem.gpu_types), "x": snap.alloc.x.tolist(),
                    "solve_seconds": snap.alloc.solve_seconds, "stage": snap.alloc.info.get("stage"),
                    **snap.alloc.outcome()})
            log.info("allocation v%d: %d tenants, mode %s%s", snap.version, len(tenants), self.mode,
                     "" if snap.alloc is None else " ({stage}, {solver}, gap {optimality_gap})".format(
                         **snap.alloc.outcome()))
            return snap

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
                    self.current()
                except Exception:
                    log.exception("recomputation failed")

    def _round_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                res = self.run_round()
            except Exception:
                log.exception("round failed")
                res = False
            if res is None:           # nothing to grant yet: sleep until there is an allocation
                self.allocated.wait(self.round_seconds)
                continue
            self.stopping.wait(self.round_seconds)

    def run_round(self) -> RoundResult | None:
        with self.lock:
            snap = self.current()
            if snap.alloc is None:
                return None
            p = snap.problem
            res = self.rounds.step(list(p.tenants), list(p.gpu_types), p.capacity, snap.alloc.x,
                                   snap.jobs, time.time())
            self.store.save_json("rounds", self.rounds.to_dict())
            with self.new_round:      # under `lock`: rounds are published in the order granted
                self.latest, self.latest_snap = res, snap
                self.new_round.notify_all()
        ROUNDS.inc()
        MOVES.inc(res.moves)
        return res

    def close(self) -> None:
        self.stopping.set()
        self.changed.set()                   # wakes the recompute thread now, not within 0.5 s
        self.allocated.set()                 # and the round thread if it waits for an allocation
        with self.new_round:
            self.new_round.notify_all()
        for t in self.threads:
            t.join(timeout=5)
        self.store.close()
