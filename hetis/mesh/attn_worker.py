"""The attention worker's runtime: a KV cache and the tensor loops, no weights.

It registers in Redis and waits. A dense worker's ``Join`` tells it the
model's attention shape and where to rendezvous; on the first one it
allocates its KV store and profiles its attention cost (the dispatcher's
starting model). Every ``Join`` opens a tensor channel to that dense worker and
serves its steps on a thread of its own
(:class:`~hetis.mesh.tensor_path.AttentionLoop`) until the channel stops.
Several dense workers (serving instances) share one attention worker this
way: their loops write one KV store, whose blocks the router hands out under
one accounting, so no two loops ever touch the same block. When a channel's
dense worker goes away the channel closes and its thread ends, and a
restarted dense worker simply joins again. A ``Join`` whose shape differs from the
store's (another model) is refused.
"""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Gauge

from hetis.mesh import wire
from hetis.mesh.discovery import Registration, Residency
from hetis.mesh.flags import WorkerConfig, describe_device
from hetis.mesh.tensor_path import (ATTN, CHANNEL_TIMEOUT, AttentionLoop, connect_store,
                                    open_channel)
from hetis.model import compute
from hetis.model.attention import AttentionBackend, profile_attention
from hetis.model.dense import DTYPES

log = logging.getLogger("hetis.attn_worker")
KV_USED = Gauge("hetis:kv_used_tokens", "KV cache in use, tokens x head groups", ["worker"])
KV_TOTAL = Gauge("hetis:kv_total_tokens", "KV cache capacity, tokens x head groups", ["worker"])
ATTN_STEPS = Gauge("hetis:attn_steps", "decode/prefill steps served", ["worker"])


class InAnotherGroup(RuntimeError):
    """Join for a model whose attention shape differs from the one this worker's store holds."""


class AttentionWorker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.wid = cfg.worker_id or ""
        self.device = cfg.device
        self.loops: dict[str, tuple[AttentionLoop, threading.Thread, object]] = {}  # by group id
        self.peers: dict[str, str] = {}  # joining end -> its group id
        self.shape: wire.AttentionShape | None = None
        self.kv = None             # the KV store every loop writes (first Join allocates it)
        self.cost = (0.0, 0.0)     # profiled at the first Join
        self.residency: Residency | None = None
        self.lock = threading.Lock()
        self.registration: Registration | None = None

    @property
    def live_loops(self) -> list[AttentionLoop]:
        return [lp for lp, th, _ in list(self.loops.values()) if th.is_alive()]

    def register(self, port: int) -> None:
        address = f"{self.cfg.advertised}:{port}"
        self.wid = self.cfg.worker_id or f"attn-{address}"
        KV_TOTAL.labels(self.wid).set(self.cfg.kv_tokens)
        self.registration = Registration(self.cfg.redis_url, self.wid, "attention", address,
                                         describe_device(self.device), self.cfg.kv_tokens,
                                         telemetry=self.telemetry).start()

    def join(self, shape: wire.AttentionShape, rv: wire.Rendezvous) -> None:
        """Join a dense worker's tensor channel (the same channel again is a no-op)."""
        with self.lock:
            old = self.loops.get(rv.group_id)
            if old is not None and old[1].is_alive():
                return
            if self.shape is not None and shape != self.shape:
                raise InAnotherGroup(f"this worker's KV cache holds {self.shape}; a dense worker "
                                     f"asked for {shape}: restart this worker to serve another model")
            if self.kv is None:
                # on a thread of its own that ends here: the store's fill and the profile run
                # parallel regions, and a gRPC thread that ran them would keep an OpenMP team
                # beside the loop's for the process's life (hetis/model/compute.py)
                self.kv, self.cost = compute.run_on_fresh_thread(self._allocate, shape)
                self.shape = shape
                self.residency = Residency(shape.block_size)
            backend = AttentionBackend(shape.num_layers, 0, shape.block_size, shape.head_dim,
                                       shape.q_per_group, DTYPES[shape.dtype], self.device,
                                       store=self.kv)
        # the rendezvous blocks until the dense worker's end is there: not under the lock, so a
        # rendezvous its dense worker gave up on never holds up the others' joins
        store = connect_store(rv.master_addr, rv.master_port, timeout=120)
        channel = open_channel(rv.backend, store, rv.group_id, ATTN, CHANNEL_TIMEOUT,
                               host=self.cfg.advertised)
        comm = "cuda" if rv.backend == "nccl" else "cpu"
        loop = AttentionLoop(backend, channel, shape.num_layers, self.cost, comm_device=comm,
                             residency=self.residency)
        thread = threading.Thread(target=self._run, args=(loop, rv.group_id), daemon=True,
                                  name=f"attention-{rv.group_id}")
        with self.lock:
            old = self.loops.get(self.peers.get(rv.peer, "")) if rv.peer else None
            if old is not None:  # replaced: it ends by itself (closed, or silent too long)
                self.residency.drop(old[0].seqs)
                log.info("tensor channel %s of %s replaced by %s", self.peers[rv.peer], rv.peer,
                         rv.group_id)
            # ended channels are forgotten; the store client lives as long as its channel
            self.loops = {g: v for g, v in self.loops.items() if v[1].is_alive()}
            self.loops[rv.group_id] = (loop, thread, store)
            if rv.peer:
                self.peers[rv.peer] = rv.group_id
            thread.start()
            log.info("joined tensor channel %s of %s:%d (%s); %d channels; cost %.3g s/token, "
                     "%.3g s/group", rv.group_id, rv.master_addr, rv.master_port, rv.backend,
                     len(self.loops), *self.cost)

    def _allocate(self, shape: wire.AttentionShape):
        """The KV store for ``shape`` and its profiled attention cost (before anything lives in it)."""
        num_blocks = max(1, self.cfg.kv_tokens // shape.block_size)
        first = AttentionBackend(shape.num_layers, num_blocks, shape.block_size, shape.head_dim,
                                 shape.q_per_group, DTYPES[shape.dtype], self.device,
                                 kv_cache_dtype=self.cfg.kv_cache_dtype)
        st = first.store
        log.info("KV cache: %d tokens x head groups, %s (%.0f MiB)", num_blocks * shape.block_size,
                 "int8 rows with float32 scales" if st.quantized else shape.dtype,
                 num_blocks * shape.block_size * shape.num_layers * st.token_bytes / 2 ** 20)
        return st, profile_attention(first)

    def _run(self, loop: AttentionLoop, group_id: str) -> None:
        try:
            loop.run()
            log.info("tensor channel %s stopped", group_id)
        except Exception as e:  # noqa: BLE001 - the dense worker went away: the channel is gone
            log.warning("tensor channel %s ended: %s", group_id, " ".join(str(e).split())[:200])
        finally:  # what only it wrote is no longer anyone's (the router freed it)
            if self.residency is not None:
                self.residency.drop(loop.seqs)

    def telemetry(self) -> dict:
        loops = self.live_loops
        if self.residency is None:
            return {"kv_used_tokens": 0, "resident": {}, "steps": 0}
        steps = sum(lp.steps for lp, _, _ in list(self.loops.values()))
        learned = [lp.cost_per_token for lp in loops if lp.steps] or [self.cost[0]]
        t = {"kv_used_tokens": self.residency.used_tokens,
             "resident": {str(s): g for s, g in self.residency.groups().items()},
             "cost_per_token": sum(learned) / len(learned), "cost_per_group": self.cost[1],
             "steps": steps}
        KV_USED.labels(self.wid).set(t["kv_used_tokens"])
        ATTN_STEPS.labels(self.wid).set(steps)
        return t

    def stats(self):
        res = self.residency.groups() if self.residency else {}
        return wire.attn_stats_to_proto(self.wid, describe_device(self.device), self.cfg.kv_tokens,
                                        bool(self.live_loops), self.telemetry(), res)

    def join_response(self):
        return wire.join_response_to_proto(self.wid, self.cfg.kv_tokens, describe_device(self.device))

    def close(self, drain_timeout: float = 30.0) -> None:
        """Drain, then deregister: say we are draining, wait (up to ``drain_timeout``) until
        the router has moved every sequence we hold elsewhere, then leave."""
        if self.registration is None:
            return
        if self.live_loops:
            self.registration.set_draining()
            deadline = time.monotonic() + drain_timeout
            # wait while something still lives here and steps still come (no router, no wait)
            while (self.residency.blocks and time.monotonic() < deadline
                   and any(time.monotonic() - lp.last_seen < 3.0 for lp in self.live_loops)):
                time.sleep(0.1)
            left = len(self.residency.blocks)
            log.info("drained: %s", f"{left} sequences still here after {drain_timeout:.0f} s"
                     if left else "nothing left here")
        self.registration.stop()
