"""The dense worker's runtime: the weights, the executor, and the tensor group it leads.

It loads the model on ``--device``, keeps a local attention backend (its own
device serves the head groups the router places there), and executes each
``Step`` the router sends. :meth:`DenseWorker.connect` opens one tensor
channel per attention worker (a two-rank process group with its own
rendezvous in this worker's TCPStore; NCCL when both ends are CUDA devices,
gloo otherwise; a peer that does not answer within ``--peer-timeout`` is
lost), measures each link, and swaps in an executor whose backends 1..N are
:class:`~hetis.mesh.tensor_path.RemoteAttention`.

Losing an attention worker: when its channel fails in a step (it died, or did
not answer within ``--peer-timeout``), the other channels finish that step with
dummy tensors so they stay in step (:meth:`RemoteAttention.drain`), the lost
backend is replaced by a :class:`LostBackend`, and the step fails with
:class:`BackendsLost` naming the backend indices; the router then recomputes
the sequences that lived there on the other devices and retries the rest.

Sampling across the wire needs no state here: a seeded draw depends on the
request's seed and the token's position only (hetis/model/sampler.py).
"""
from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
import torch.distributed as dist

from hetis.defaults import DEFAULT_MODEL_NAME
from hetis.engine.step import Step, StepTimes
from hetis.mesh import wire
from hetis.mesh.discovery import Registration, Residency
from hetis.mesh.flags import DenseWorkerConfig, describe_device
from hetis.mesh.tensor_path import DENSE, PeerLost, RemoteAttention, open_channel, serve_store
from hetis.model.attention import AttentionBackend, profile_attention
from hetis.model.dense import DenseModel, parse_dtype
from hetis.model.executor import Executor
from hetis.model.loader import load
from hetis.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("hetis.dense_worker")


class ConnectFailed(RuntimeError):
    """None of the attention workers asked for could be joined."""


class BackendsLost(RuntimeError):
    """A step failed because these backends' attention workers are gone."""

    def __init__(self, backends: list[int], message: str):
        self.backends = backends
        super().__init__(message)


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
        self.dtype = parse_dtype(cfg.dtype)
        mc, sd, _tok = load(cfg.model, self.dtype)
        self.model_cfg = mc
        self.model = DenseModel(mc, sd, self.dtype, cfg.device)
        self.local = AttentionBackend(mc.num_layers, max(1, cfg.kv_tokens // cfg.block_size),
                                      cfg.block_size, mc.head_dim, mc.q_per_group, self.dtype,
                                      cfg.device)
        self.cost = profile_attention(self.local)
        self.residency = Residency(cfg.block_size)
        self.executor = Executor(self.model, [self.local])
        self.peers: list[wire.Peer] = []     # backend i + 1 is peers[i]
        self.dist_backends: set[str] = set()
        self.connect_lock = threading.Lock()
        self.step_lock = threading.Lock()
        self.wid = cfg.worker_id or ""
        self.steps = 0
        self.registration: Registration | None = None
        self.store: dist.TCPStore | None = None
        self.lost_channels: list[RemoteAttention] = []
        self.incarnation = uuid.uuid4().hex  # a restarted worker answers Info with another

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
        replaced workers do not grow the list) or the next. Joining happens
        outside the step lock (steps go on); only the swap-in takes it. Raises
        ConnectFailed when none of the new workers could be joined. ``renew``: addresses
        whose live channel is dropped first (told to stop if it still can) and joined anew:
        the router lost that worker through another dense worker's channel.
        """
        with self.connect_lock:
            for addr in set(renew) & set(addrs):
                self._drop(addr)
            live = {p.address for p in self.peers if not p.lost}
            todo = [a for a in dict.fromkeys(addrs) if a not in live]
            errors = []
            for addr in todo:
                try:
                    remote, peer = self._join(addr)
                except (grpc.RpcError, PeerLost, RuntimeError) as e:
                    why = e.details() if isinstance(e, grpc.RpcError) else str(e)
                    log.warning("attention worker at %s: join failed: %s", addr, why)
                    errors.append(f"{addr}: {why}")
                    continue
                with self.step_lock:
                    backends = self.executor.backends
                    # a lost slot is reused: the same address first, else the first lost one
                    lost = [i for i, p in enumerate(self.peers) if p.lost]
                    old = next((i for i in lost if self.peers[i].address == addr),
                               lost[0] if lost else None)
                    if old is None:
                        backends.append(remote)
                        self.peers.append(peer)
                    else:
                        backends[old + 1], self.peers[old] = remote, peer
                log.info("attention worker %s at %s is backend %d: latency %.1f us, bandwidth %.2f GB/s",
                         peer.id, addr, backends.index(remote), peer.latency_s * 1e6, peer.bandwidth_bps / 1e9)
            if todo and len(errors) == len(todo):
                raise ConnectFailed("; ".join(errors))
            return self.info()

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
            rv = wire.Rendezvous(self.cfg.advertised, self.store.port, 1, 2, backend, group_id)
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(stub.Join, wire.join_to_proto(shape, rv), timeout=180)
                channel = open_channel(backend, self.store, group_id, DENSE, self.cfg.peer_timeout)
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

    def execute(self, step: Step) -> tuple[list[int], StepTimes]:
        """Run one step; IndexError/ValueError mean a layout that does not fit this worker."""
        with self.step_lock, torch.inference_mode():
            self.residency.update(step.work[0], step.freed)
            try:
                toks = self.executor.execute(step)
            except PeerLost as e:
                lost = self._lose(e.peer)
                raise BackendsLost(lost, str(e)) from e
            self.steps += 1
            return toks, self.executor.last_times

    def _lose(self, peer: RemoteAttention) -> list[int]:
        """Drop a failed peer; drain the others' aborted step (any that fails is lost too)."""
        backends = self.executor.backends
        lost = [i for i, be in enumerate(backends) if be is peer]
        for i, be in enumerate(backends):
            if isinstance(be, RemoteAttention) and be is not peer:
                try:
                    be.drain(self.model_cfg.num_layers)
                except PeerLost:
                    lost.append(i)
        for i in lost:
            log.error("attention worker %s (backend %d) lost", backends[i].peer_id, i)
            self.lost_channels.append(backends[i])  # dropped, never destroyed mid-operation
            backends[i] = LostBackend(backends[i].peer_id)
            self.peers[i - 1].lost = True
        return sorted(lost)

    def telemetry(self) -> dict:
        return {"kv_used_tokens": self.residency.used_tokens,
                "resident": {str(s): g for s, g in self.residency.groups().items()},
                "cost_per_token": self.cost[0], "cost_per_group": self.cost[1], "steps": self.steps}

    def close(self) -> None:
        for be in self.executor.backends[1:]:
            try:
                if isinstance(be, RemoteAttention):
                    be.stop()
            except Exception:  # noqa: BLE001 - a worker may be gone already
                pass
        if self.registration is not None:
            self.registration.stop()
