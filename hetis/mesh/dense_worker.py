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

Sampling across the wire: a seeded request's generator lives here, one per
sequence, created at its first sampled step and dropped when the router says
the sequence was freed, so a seed gives the same tokens as in ``hetis.LLM``.
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
from hetis.mesh.service import GRPC_OPTIONS
from hetis.mesh.tensor_path import DENSE, PeerLost, RemoteAttention, open_channel, serve_store
from hetis.model.attention import AttentionBackend, profile_attention
from hetis.model.dense import DenseModel, parse_dtype
from hetis.model.executor import Executor
from hetis.model.loader import load
from hetis.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("hetis.dense_worker")


class AlreadyConnected(RuntimeError):
    """Connect asked for other attention workers than the group this worker leads."""


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
        self.peers: list[wire.Peer] = []
        self.dist_backend = ""
        self.connected: tuple[str, ...] | None = None
        self.generators: dict[int, torch.Generator] = {}
        self.step_lock = threading.Lock()
        self.wid = cfg.worker_id or ""
        self.steps = 0
        self.registration: Registration | None = None
        self.store: dist.TCPStore | None = None
        self.lost_channels: list[RemoteAttention] = []

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
                                        c.kv_tokens, self.peers, self.dist_backend)

    def connect(self, addrs: tuple[str, ...]) -> worker_pb2.DenseInfo:
        """Lead a tensor group with these attention workers (once; the same list again is a no-op)."""
        with self.step_lock:
            if self.connected is not None:
                if addrs == self.connected:
                    return self.info()
                raise AlreadyConnected(f"already connected to {list(self.connected)}; restart the "
                                       "dense worker to change its attention workers")
            if addrs:
                self._form_group(addrs)
            self.connected = addrs
            return self.info()

    def _form_group(self, addrs: tuple[str, ...]) -> None:
        channels = [grpc.insecure_channel(a, options=GRPC_OPTIONS) for a in addrs]
        try:
            self._form_group_over(addrs, [worker_pb2_grpc.AttentionWorkerStub(c) for c in channels])
        finally:
            for c in channels:
                c.close()

    def _form_group_over(self, addrs: tuple[str, ...], stubs: list) -> None:
        devices = [s.Stats(worker_pb2.StatsRequest(), timeout=30).device for s in stubs]
        # NCCL only when every end is a CUDA device; otherwise gloo over CPU tensors
        cuda = self.cfg.device.startswith("cuda") and all(d.startswith("cuda") for d in devices)
        self.dist_backend = "nccl" if cuda else "gloo"
        if self.store is None:
            self.store = serve_store(self.cfg.dist_port)
        mc = self.model_cfg
        shape = wire.AttentionShape(mc.num_layers, mc.q_per_group, mc.head_dim,
                                    self.cfg.block_size, self.cfg.dtype)
        comm = "cuda" if cuda else "cpu"
        joined, remotes = [], []
        with ThreadPoolExecutor(1) as pool:
            for stub in stubs:  # one channel per pair, each with its own rendezvous
                group_id = uuid.uuid4().hex[:12]
                rv = wire.Rendezvous(self.cfg.advertised, self.store.port, 1, 2, self.dist_backend,
                                     group_id)
                answer = pool.submit(stub.Join, wire.join_to_proto(shape, rv), timeout=180)
                channel = open_channel(self.dist_backend, self.store, group_id, DENSE,
                                       self.cfg.peer_timeout)
                joined.append(answer.result())
                remotes.append(RemoteAttention(channel, mc.q_per_group, mc.head_dim, self.dtype,
                                               comm, self.cfg.device, peer_id=joined[-1].id))
        self.peers = []
        for addr, j, r in zip(addrs, joined, remotes):
            lat, bw = r.measure_link()
            self.peers.append(wire.Peer(j.id, addr, j.device, j.kv_tokens, lat, bw))
            log.info("attention worker %s at %s: latency %.1f us, bandwidth %.2f GB/s",
                     j.id, addr, lat * 1e6, bw / 1e9)
        self.executor = Executor(self.model, [self.local] + remotes)

    # ------------------------------------------------------------ the step
    @property
    def num_backends(self) -> int:
        return len(self.executor.backends)

    def execute(self, step: Step) -> tuple[list[int], StepTimes]:
        """Run one step; IndexError/ValueError mean a layout that does not fit this worker."""
        for s in step.freed:
            self.generators.pop(s, None)
        for c in step.chunks:
            if c.sample and c.params.seed is not None:
                c.generator = self.generators.get(c.seq_id)
                if c.generator is None:
                    g = torch.Generator(device=self.model.device).manual_seed(c.params.seed)
                    c.generator = self.generators[c.seq_id] = g
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
