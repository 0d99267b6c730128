"""The router's dense workers (serving instances) and how their devices map onto the engine's.

The engine keeps one device list for the whole mesh: each dense worker's own
device and every attention worker, once (hetis/engine/instance.py). Each
dense worker numbers its backends its own way (0: itself, i: the i-th
attention worker it joined), so every dense worker has a
:class:`RemoteExecutor` that translates: the step's per-device work goes to
that worker's backend indices, and the backends it reports lost come back as
engine device indices. ``backend_of`` is rebuilt from the worker's ``Info``
(its peers, by worker id) whenever its channels change (:meth:`Fleet.sync`).

An attention device the engine lost (through any dense worker's channel) is
only used again through channels opened after the loss: every dense worker
that had one to it is asked to renew it (``Connect`` with ``renew``), so a
channel that is dead but not yet noticed is never trusted again. All the
methods taking ``eng`` run on the serving loop's thread (``ServingLoop.call``)
or before the loop starts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields, replace

import grpc
from prometheus_client import Counter

from hetis.engine.dispatcher import Device
from hetis.engine.engine import Engine
from hetis.engine.step import DevicesLost, InstanceLost, Step, StepFailed, StepTimes
from hetis.mesh import wire
from hetis.v1 import worker_pb2_grpc

log = logging.getLogger("hetis.router")
STEP_TIME = Counter("hetis:step_seconds_total", "router step time by part", ["part"])


@dataclass
class StepStats:
    """Where the router's steps spend their time (cumulative)."""
    steps: int = 0
    rpc_s: float = 0.0          # whole Step call as seen by the router
    dense_total_s: float = 0.0  # inside the dense worker
    dense_s: float = 0.0
    local_attn_s: float = 0.0
    exchange_wait_s: float = 0.0
    move_s: float = 0.0

    def add(self, rpc_s: float, t: StepTimes) -> None:
        self.steps += 1
        self.rpc_s += rpc_s
        self.dense_total_s += t.total
        self.dense_s += t.dense
        self.local_attn_s += t.local_attn
        self.exchange_wait_s += t.exchange_wait
        self.move_s += t.move
        for part, v in (("step_call", rpc_s), ("dense_worker", t.total), ("dense_compute", t.dense),
                        ("local_attn", t.local_attn), ("exchange_wait", t.exchange_wait),
                        ("kv_move", t.move)):
            STEP_TIME.labels(part).inc(v)

    def __iadd__(self, o: "StepStats") -> "StepStats":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))
        return self


# a Step call that fails this way means the dense worker is gone (or not answering)
GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RemoteExecutor:
    """The executor interface (``execute(step)``), carried out by one dense worker over gRPC.
    Head-group moves go with the step; the dense worker copies their KV over its tensor
    channels before the step's attention (hetis/mesh/tensor_path.py)."""

    supports_moves = True

    def __init__(self, stub: worker_pb2_grpc.DenseWorkerStub, name: str, timeout: float = 120.0):
        self.stub, self.name, self.timeout = stub, name, timeout
        self.stats = StepStats()
        self.last_times = StepTimes()
        # (engine device -> this worker's backend, its number of backends): swapped whole
        self.mapping: tuple[dict[int, int], int] = ({0: 0}, 1)
        self._step_id = 0

    @property
    def backend_of(self) -> dict[int, int]:
        return self.mapping[0]

    def execute(self, step: Step) -> list[int]:
        self._step_id += 1
        backend_of, n = self.mapping  # swapped whole by Fleet.sync

        def backend(d: int) -> int:
            if d not in backend_of:  # left its reach meanwhile: recover what lives there
                raise DevicesLost([d], f"dense worker {self.name}: device {d} is not one of its "
                                  "backends", ran=False)
            return backend_of[d]
        work = [[] for _ in range(n)]
        for d, items in enumerate(step.work):
            if items:
                work[backend(d)] = items
        moves = [replace(m, src=backend(m.src), dst=backend(m.dst)) for m in step.moves]
        t0 = time.perf_counter()
        try:
            resp = self.stub.Step(wire.step_to_proto(Step(step.chunks, work, step.freed, moves),
                                                     self._step_id), timeout=self.timeout)
        except grpc.RpcError as e:
            msg = f"dense worker {self.name} step failed: {e.code().name}: {e.details()}"
            lost = wire.lost_backends_from_metadata(e.trailing_metadata())
            if lost:
                device_of = {b: d for d, b in backend_of.items()}
                raise DevicesLost([device_of[b] for b in lost if b in device_of], msg) from None
            if e.code() in GONE:
                raise InstanceLost(msg) from None
            raise StepFailed(msg) from None
        tokens, self.last_times = wire.step_result_from_proto(resp)
        self.stats.add(time.perf_counter() - t0, self.last_times)
        return tokens


@dataclass
class DenseHandle:
    """One dense worker as the router drives it."""
    wid: str
    address: str
    channel: grpc.Channel
    stub: worker_pb2_grpc.DenseWorkerStub
    executor: RemoteExecutor
    incarnation: str
    index: int = -1                       # its instance in the engine
    local: int = -1                       # its own device in the engine
    lost: bool = False
    renew: set[str] = field(default_factory=set)          # attention ids whose channel to renew
    retry_at: dict[str, float] = field(default_factory=dict)  # attention id -> next Connect try


class Fleet:
    """Dense workers and attention workers as the engine's instances and devices."""

    def __init__(self):
        self.dense: dict[str, DenseHandle] = {}   # by worker id
        self.device_ids: list[str] = []           # engine device index -> worker id
        self.kinds: dict[str, str] = {}           # worker id -> "dense" | "attention"
        self.gone: set[str] = set()               # attention ids not alive (or draining) in Redis

    def handle(self, wid: str, address: str, channel: grpc.Channel, incarnation: str) -> DenseHandle:
        stub = worker_pb2_grpc.DenseWorkerStub(channel)
        return DenseHandle(wid, address, channel, stub, RemoteExecutor(stub, wid), incarnation)

    # ------------------------------------------------------------ on the loop thread
    def attach(self, eng: Engine | None, h: DenseHandle, info, build) -> Engine:
        """A dense worker becomes an instance (its device added, a lost one's slot reused);
        ``build(executor, devices)`` makes the engine when there is none yet."""
        dev = Device(h.wid, max(1, info.kv_tokens // info.block_size))
        if eng is None:
            eng = build(h.executor, [dev])
            h.local, h.index = 0, 0
            eng.instances[0].name = h.wid
            self.device_ids[:] = [h.wid]
        else:
            devs = eng.dispatcher.devices
            slot = next((i for i, wid in enumerate(self.device_ids) if devs[i].lost and wid == h.wid),
                        None)
            h.local = eng.add_device(dev, index=slot)
            if slot is None:
                self.device_ids.append(h.wid)
            old = next((i for i, inst in enumerate(eng.instances) if inst.lost and inst.name == h.wid),
                       None)
            h.index = eng.add_instance(h.wid, h.executor, h.local, {h.local}, index=old)
        self.kinds[h.wid] = "dense"
        self.dense[h.wid] = h
        self.sync(eng, h, info)
        return eng

    def sync(self, eng: Engine, h: DenseHandle, info, renewed=()) -> None:
        """Map the worker's live peers onto engine devices (new ones added, lost ones that
        it has joined anew revived); its instance then reaches exactly those."""
        h.renew -= set(renewed)
        backend_of = {h.local: 0}
        devs = eng.dispatcher.devices
        for b, p in enumerate(info.peers, start=1):
            if p.lost or p.id in h.renew:
                continue
            live = p.id in self.device_ids and not devs[self.device_ids.index(p.id)].lost
            if p.id in self.gone and not live:  # draining or dead: never (re)enters dispatch
                continue
            d = self._attention_device(eng, p, info.block_size)
            if d is not None:
                backend_of[d] = b
        h.executor.mapping = (backend_of, len(info.peers) + 1)
        eng.instances[h.index].reach = set(backend_of)

    def _attention_device(self, eng: Engine, p, block_size: int) -> int | None:
        devs = eng.dispatcher.devices
        dev = Device(p.id, max(1, p.kv_tokens // block_size), remote=True, latency=p.latency_s,
                     bandwidth=p.bandwidth_bps)
        self.kinds[p.id] = "attention"
        if p.id in self.device_ids:
            d = self.device_ids.index(p.id)
            if devs[d].lost:  # back, through a channel opened since it was lost
                eng.add_device(dev, index=d)
                log.info("attention worker %s is back in dispatch as device %d", p.id, d)
            return d
        # a new worker: the slot of one that is gone for good, or the next
        slot = next((i for i, wid in enumerate(self.device_ids) if devs[i].lost
                     and self.kinds.get(wid) == "attention" and wid in self.gone), None)
        d = eng.add_device(dev, index=slot)
        if slot is None:
            self.device_ids.append(p.id)
        else:
            self.device_ids[slot] = p.id
        log.info("attention worker %s joined dispatch as device %d", p.id, d)
        return d

    def note_draining(self, eng: Engine, by_id: dict) -> None:
        """Attention workers draining in Redis (told to stop) are drained by moves
        (``Engine.drain_device``); once one has left Redis (or came back as a new process),
        what is still there is lost."""
        devs = eng.dispatcher.devices
        for i, wid in enumerate(self.device_ids):
            w = by_id.get(wid, {})
            if self.kinds.get(wid) != "attention" or devs[i].lost:
                continue
            if devs[i].draining and not (w.get("alive") and w.get("draining")):
                moved = eng.lose_devices([i])
                log.info("attention worker %s left%s", wid,
                         f": {len(moved)} sequences still there are recomputed" if moved else "")
            elif not devs[i].draining and w.get("draining"):
                moved = eng.drain_device(i)
                log.info("attention worker %s is draining: its head groups move elsewhere%s", wid,
                         f" ({len(moved)} sequences recomputed)" if moved else "")

    def note_losses(self, eng: Engine) -> None:
        """Devices the engine lost leave every instance's reach; the dense workers that had a
        channel to them must renew it before they are used again."""
        devs = eng.dispatcher.devices
        for h in list(self.dense.values()):
            if h.lost:
                continue
            gone = [d for d in h.executor.backend_of if d != h.local and devs[d].lost]
            if gone:
                h.renew |= {self.device_ids[d] for d in gone}
                backend_of, n = h.executor.mapping
                h.executor.mapping = ({d: b for d, b in backend_of.items() if d not in gone}, n)
                eng.instances[h.index].reach = set(h.executor.backend_of)

    def lose(self, eng: Engine, h: DenseHandle) -> int:
        """A dense worker is gone: its sequences move to the other instances."""
        h.lost = True
        if eng.instances[h.index].lost:
            return 0
        return len(eng.lose_instance(h.index))

    def reaches(self, h: DenseHandle, wid: str) -> bool:
        return wid in self.device_ids and self.device_ids.index(wid) in h.executor.backend_of \
            and wid not in h.renew

    def stats(self) -> StepStats:
        total = StepStats()
        for h in list(self.dense.values()):
            total += h.executor.stats
        return total
