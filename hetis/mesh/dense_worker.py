"""The dense worker's runtime: the weights, the executor, and the tensor channels it leads.

It loads the model on ``--device``, keeps a local attention backend (its own
device serves the head groups the router places there), and executes each
``Step`` the router sends. :meth:`DenseWorker.connect` opens one tensor
channel per attention worker (a two-rank process group with its own
rendezvous in this worker's TCPStore; NCCL when both ends are CUDA devices,
gloo otherwise; a peer that does not answer within ``--peer-timeout`` is
lost), measures each link, and installs a
:class:`~hetis.mesh.tensor_path.RemoteAttention` as backend 1..N.

Losing an attention worker: when its channel fails in a step (it died, or did
not answer within ``--peer-timeout``), the step goes on to its end without it
(its rows zeros: the other channels stay in step), the lost backend is
replaced by a :class:`LostBackend`, and the step fails with
:class:`BackendsLost` naming the backend indices; the router then recomputes
the sequences that lived there on the other devices and retries the rest.

With ``--tp K`` the worker is K processes (hetis/mesh/tp.py): this one is
rank 0 and drives the others; every rank holds its share of the weights and
head groups, its own local KV for them and its own channel to each attention
worker. Steps and connects are broadcast to the ranks and their outcomes
agreed, so all ranks keep the same backends.

Sampling across the wire needs no state here: a seeded draw depends on the
request's seed and the token's position only (hetis/model/sampler.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
import torch.distributed as dist

from hetis.defaults import DEFAULT_MODEL_NAME
from hetis.engine.step import AttnItem, Step, StepTimes
from hetis.mesh import wire
from hetis.mesh.discovery import Registration, Residency
from hetis.mesh.flags import DenseWorkerConfig, describe_device
from hetis.mesh.tensor_path import (DENSE, KEEPALIVE, PeerLost, RemoteAttention, connect_store,
                                    open_channel, serve_store)
from hetis.mesh.tp import TPBroken, TPGroup, spawn_ranks
from hetis.model.attention import AttentionBackend, profile_attention
from hetis.model.dense import DenseModel, parse_dtype
from hetis.model.executor import Executor, RemoteFailed
from hetis.model.loader import load
from hetis.model.tp import group_split, shard
from hetis.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("hetis.dense_worker")


class ConnectFailed(RuntimeError):
    """None of the attention workers asked for could be joined."""


class BackendsLost(RuntimeError):
    """A step failed because these backends' attention workers are gone."""

    def __init__(self, backends: list[int], message: str):
        self.backends = backends
        super().__init__(message)


class StepAbandoned(RuntimeError):
    """The caller of a step is gone by the time the worker could run it."""


class LostBackend:
    """Stands where a lost attention worker was, so backend indices stay the router's."""

    remote = False

    def __init__(self, peer_id: str):
        self.peer_id = peer_id

    def begin_step(self, items) -> None:
        raise ValueError(f"work: attention worker {self.peer_id} is lost; place nothing there")


class DenseWorker:
    def __init__(self, cfg: DenseWorkerConfig):
        self.cfg = cfg
        self.rank = cfg.tp_rank
        self.dtype = parse_dtype(cfg.dtype)
        mc, sd, _tok = load(cfg.model, self.dtype, cfg.weights)
        self.model_cfg = mc
        if cfg.tp > 1:
            group_split(mc.num_groups, cfg.tp)  # ValueError naming --tp before anything starts
        self.store: dist.TCPStore | None = None
        self.followers = []
        if cfg.tp > 1 and self.rank == 0:  # the store first: the other ranks rendezvous in it
            self.store = serve_store(cfg.dist_port)
            self.followers = spawn_ranks(cfg, cfg.advertised, self.store.port)
        elif cfg.tp > 1:
            host, port = cfg.tp_store.rsplit(":", 1)
            self.store = connect_store(host, int(port), timeout=600)
        self.model = DenseModel(mc, sd, self.dtype, cfg.device)
        self.tp = TPGroup(self.store, self.rank, cfg.tp, cfg.device, host=cfg.advertised) \
            if cfg.tp > 1 else None
        groups = shard(self.model, self.rank, cfg.tp, self.tp.all_reduce) if self.tp else None
        # block ids are the router's, over every group: each rank's store spans them all
        # (pages are touched only where its own groups live)
        self.local = AttentionBackend(mc.num_layers, max(1, cfg.kv_tokens // cfg.block_size),
                                      cfg.block_size, mc.head_dim, mc.q_per_group, self.dtype,
                                      cfg.device, kv_cache_dtype=cfg.kv_cache_dtype)
        self.cost = profile_attention(self.local)
        self.residency = Residency(cfg.block_size)
        self.executor = Executor(self.model, [self.local], groups)
        self.peers: list[wire.Peer] = []     # backend i + 1 is peers[i]
        self.dist_backends: set[str] = set()
        self.connect_lock = threading.Lock()
        self.step_lock = threading.RLock()
        self.wid = cfg.worker_id or ""
        self.steps = 0
        self.registration: Registration | None = None
        self.lost_channels: list[RemoteAttention] = []
        self.incarnation = uuid.uuid4().hex  # a restarted worker answers Info with another
        self.last_step = time.monotonic()
        self._closed = threading.Event()
        threading.Thread(target=self._keepalive, daemon=True, name="keepalive").start()

    def _keepalive(self) -> None:
        """Between steps, tell idle attention workers every KEEPALIVE seconds that we are
        here (they give up a channel silent for CHANNEL_TIMEOUT). A failure is left for the
        next step to find (it raises PeerLost there and the router recovers)."""
        while not self._closed.wait(KEEPALIVE / 2):
            if time.monotonic() - self.last_step < KEEPALIVE / 2:
                continue
            with self.step_lock:
                for be in list(self.executor.backends):
                    if isinstance(be, RemoteAttention) and not getattr(be, "silent", False):
                        try:
                            be.keepalive()
                        except PeerLost as e:
                            be.silent = True
                            log.warning("keepalive: %s", e)
                self.last_step = time.monotonic()

    def register(self, port: int) -> None:
        """Announce this worker in Redis (heartbeats and telemetry follow in the background)."""
        address = f"{self.cfg.advertised}:{port}"
        self.wid = self.cfg.worker_id or f"dense-{address}"
        self.registration = Registration(self.cfg.redis_url, self.wid, "dense", address,
                                         describe_device(self.cfg.device), self.cfg.kv_tokens,
                                         telemetry=self.telemetry).start()

    # ------------------------------------------------------------ membership
    def info(self) -> worker_pb2.DenseInfo:
        c = self.cfg
        return wire.dense_info_to_proto(self.wid, c.model or DEFAULT_MODEL_NAME, c.dtype,
                                        describe_device(c.device), self.model_cfg, c.block_size,
                                        c.kv_tokens, self.peers, ",".join(sorted(self.dist_backends)),
                                        self.incarnation)

    def connect(self, addrs: tuple[str, ...], renew: tuple[str, ...] = ()) -> worker_pb2.DenseInfo:
        """Open a channel to each attention worker in ``addrs`` that has no live one.

        Additive, so the router can call it whenever a worker appears: a worker with a
        live channel keeps its backend index, a lost one answering again at the same
        address takes its old index back, a new one takes a lost worker's index (so
        replaced workers do not grow the list) or the next. ``renew``: addresses whose
        live channel is dropped first (told to stop if it still can) and joined anew:
        the router lost that worker through another dense worker's channel. Joining
        happens outside the step lock (steps go on; with --tp it cannot: the ranks do
        one thing at a time). Raises ConnectFailed when none of the new workers could
        be joined.
        """
        with self.connect_lock:
            renew = tuple(a for a in renew if a in addrs)
            live = {p.address for p in self.peers if not p.lost} - set(renew)
            todo = [a for a in dict.fromkeys(addrs) if a not in live]
            unreachable = []
            if self.tp:  # the ranks join under the step lock: only workers that answer now
                unreachable = [f"{a}: {why}" for a in todo if (why := self._probe(a))]
                todo = [a for a in todo if not any(u.startswith(f"{a}: ") for u in unreachable)]
            lost = [i for i, p in enumerate(self.peers) if p.lost or p.address in renew]
            plan, n = [], len(self.peers)
            for addr in todo:  # a lost slot is reused: the same address first, else the first
                slot = next((i for i in lost if self.peers[i].address == addr), lost[0] if lost else None)
                if slot is None:
                    slot, n = n, n + 1
                else:
                    lost.remove(slot)
                plan.append((addr, slot))
            with self.step_lock if self.tp else contextlib.nullcontext():
                try:
                    if self.tp:
                        self.tp.broadcast(("connect", plan, renew))
                    errors = self.apply_connect(plan, renew)
                except TPBroken as e:
                    self.abandon(e)
            errors += unreachable
            if errors and len(errors) == len(todo) + len(unreachable):
                raise ConnectFailed("; ".join(errors))
            return self.info()

    def _probe(self, addr: str) -> str | None:
        """None when the attention worker at ``addr`` answers Stats within 5 s, else why not."""
        try:
            with self.cfg.security.internal_channel(addr) as ch:
                worker_pb2_grpc.AttentionWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
            return None
        except grpc.RpcError as e:
            return e.details() or e.code().name

    def apply_connect(self, plan: list[tuple[str, int]], renew: tuple[str, ...]) -> list[str]:
        """Every rank: drop ``renew``, join each (address, backend slot) of ``plan``, agree
        (a worker not joined on every rank is dropped on all), install. Returns errors."""
        for addr in renew:
            self._drop(addr)
        joined, errors = {}, []
        for addr, slot in plan:
            try:
                joined[slot] = self._join(addr)
            except (grpc.RpcError, PeerLost, RuntimeError) as e:
                why = e.details() if isinstance(e, grpc.RpcError) else str(e)
                log.warning("attention worker at %s: join failed: %s", addr, why)
                errors.append(f"{addr}: {why}")
        failed = [slot not in joined for _, slot in plan]
        if self.tp:
            failed = self.tp.any_of(failed)
        with self.step_lock:
            backends = self.executor.backends
            for (addr, slot), bad in zip(plan, failed):
                if slot in joined and bad:  # another rank could not: nobody uses it
                    self.lost_channels.append(joined.pop(slot)[0])
                if slot not in joined:
                    remote, peer = None, wire.Peer("", addr, "", 0, 0.0, 0.0, lost=True)
                else:
                    remote, peer = joined[slot]
                while len(self.peers) <= slot:
                    self.peers.append(wire.Peer("", "", "", 0, 0.0, 0.0, lost=True))
                    backends.append(LostBackend(""))
                backends[slot + 1] = remote or LostBackend(addr)
                self.peers[slot] = peer
                if remote is not None:
                    log.info("attention worker %s at %s is backend %d: latency %.1f us, bandwidth "
                             "%.2f GB/s", peer.id, addr, slot + 1, peer.latency_s * 1e6,
                             peer.bandwidth_bps / 1e9)
        return errors

    def _drop(self, addr: str) -> None:
        with self.step_lock:
            for i, p in enumerate(self.peers):
                if p.address == addr and not p.lost:
                    be = self.executor.backends[i + 1]
                    try:
                        be.stop()  # its loop on the worker ends, if the worker is there
                    except Exception:  # noqa: BLE001 - the channel may be dead: that is why
                        pass
                    self.lost_channels.append(be)
                    self.executor.backends[i + 1] = LostBackend(p.id)
                    p.lost = True
                    log.info("channel to attention worker %s at %s dropped, to be renewed", p.id, addr)

    def _join(self, addr: str) -> tuple[RemoteAttention, wire.Peer]:
        """Ask the worker at ``addr`` to join a new channel; open it and measure the link."""
        with self.cfg.security.internal_channel(addr) as ch:
            stub = worker_pb2_grpc.AttentionWorkerStub(ch)
            device = stub.Stats(worker_pb2.StatsRequest(), timeout=30).device
            # NCCL only when both ends are CUDA devices; otherwise gloo over CPU tensors
            backend = "nccl" if self.cfg.device.startswith("cuda") and device.startswith("cuda") else "gloo"
            if self.store is None:
                self.store = serve_store(self.cfg.dist_port)
            mc = self.model_cfg
            shape = wire.AttentionShape(mc.num_layers, mc.q_per_group, mc.head_dim,
                                        self.cfg.block_size, self.cfg.dtype)
            group_id = uuid.uuid4().hex[:12]
            # every rank's channels rendezvous in rank 0's store
            host = self.cfg.tp_store.rsplit(":", 1)[0] if self.rank else self.cfg.advertised
            rv = wire.Rendezvous(host, self.store.port, 1, 2, backend, group_id,
                                 peer=f"{self.cfg.worker_id or self.cfg.advertised}/{self.incarnation}/{self.rank}")
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(stub.Join, wire.join_to_proto(shape, rv), timeout=180)
                channel = open_channel(backend, self.store, group_id, DENSE, self.cfg.peer_timeout,
                                       host=self.cfg.advertised)
                j = answer.result()
        self.dist_backends.add(backend)
        remote = RemoteAttention(channel, mc.q_per_group, mc.head_dim, self.dtype,
                                 "cuda" if backend == "nccl" else "cpu", self.cfg.device, peer_id=j.id)
        lat, bw = remote.measure_link()
        return remote, wire.Peer(j.id, addr, j.device, j.kv_tokens, lat, bw)

    # ------------------------------------------------------------ the step
    @property
    def num_backends(self) -> int:
        return len(self.executor.backends)

    def execute(self, step: Step, still_wanted=lambda: True) -> tuple[list[int], StepTimes]:
        """Run one step; IndexError/ValueError mean a layout that does not fit this worker;
        StepAbandoned when ``still_wanted()`` is false once the step lock is ours."""
        with self.step_lock, torch.inference_mode():
            if not still_wanted():
                raise StepAbandoned("its caller gave up waiting; not run")
            self.residency.update(step.work[0], step.freed)
            for m in step.moves:  # head groups leaving or joining this worker's own device
                if m.src == 0 and not m.partial:
                    self.residency.drop_group(m.seq_id, m.group)
                elif m.dst == 0:
                    self.residency.update([AttnItem(m.seq_id, m.group, 0, m.num_tokens, m.dst_blocks)])
            try:
                if self.tp:
                    self.tp.broadcast(("step", step))
                return self.run_step(step), self.executor.last_times
            except TPBroken as e:
                self.abandon(e)

    def abandon(self, why: Exception) -> None:
        """A tensor-parallel rank is gone: this worker cannot compute any more. Exit at once,
        so the router finds it gone and recomputes its requests on other instances."""
        log.critical("%s: exiting", why)
        for p in self.followers:
            p.kill()
        os._exit(3)

    def run_step(self, step: Step) -> list[int]:
        """Every rank: the step for its groups; backends lost on any rank are lost on all."""
        self.last_step = time.monotonic()
        with self.step_lock, torch.inference_mode():
            if self.tp:  # refused on every rank or on none, before any collective
                mine = self.executor.groups
                bad = any(isinstance(be, LostBackend) and any(it.group in mine for it in its)
                          for be, its in zip(self.executor.backends, step.work))
                if self.tp.any_of([bad])[0]:
                    raise ValueError("work: items for a lost attention worker's backend; place "
                                     "nothing there")
            toks, failed = [], {}
            try:
                toks = self.executor.execute(step)
            except RemoteFailed as e:
                failed = e.failed
            except Exception as e:
                if self.tp:  # this rank left the step midway: the ranks' collectives diverge
                    raise TPBroken(f"rank {self.rank}: step failed: {type(e).__name__}: {e}") from e
                raise
            if self.tp:
                agreed = self.tp.any_of([b in failed for b in range(len(self.executor.backends))])
                failed = {b: failed.get(b, "lost on another rank") for b, f in enumerate(agreed) if f}
            if failed:
                lost = self._lose(sorted(failed))
                raise BackendsLost(lost, "; ".join(str(e) for e in failed.values()))
            self.steps += 1
            return toks

    def _lose(self, indices: list[int]) -> list[int]:
        """Drop failed backends (never destroyed mid-operation: kept in lost_channels)."""
        backends = self.executor.backends
        for i in indices:
            log.error("attention worker %s (backend %d) lost", backends[i].peer_id, i)
            self.lost_channels.append(backends[i])
            backends[i] = LostBackend(backends[i].peer_id)
            self.peers[i - 1].lost = True
        return indices

    def telemetry(self) -> dict:
        return {"kv_used_tokens": self.residency.used_tokens,
                "resident": {str(s): g for s, g in self.residency.groups().items()},
                "cost_per_token": self.cost[0], "cost_per_group": self.cost[1], "steps": self.steps}

    def close(self) -> None:
        self._closed.set()
        if self.tp and self.rank == 0:
            try:
                with self.step_lock:
                    self.tp.broadcast(("stop",))
            except Exception:  # noqa: BLE001 - a rank may be gone already
                pass
            for p in self.followers:
                try:
                    p.wait(10)
                except Exception:  # noqa: BLE001 - it must not outlive us
                    p.kill()
        for be in self.executor.backends[1:]:
            try:
                if isinstance(be, RemoteAttention):
                    be.stop()
            except Exception:  # noqa: BLE001 - a worker may be gone already
                pass
        if self.registration is not None:
            self.registration.stop()
