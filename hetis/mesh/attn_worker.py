"""The attention worker's runtime: a KV cache and the tensor loop, no weights.

It registers in Redis and waits. A dense worker's ``Join`` tells it the
model's attention shape and where to rendezvous; it then allocates its KV
store, profiles its attention cost (the dispatcher's starting model), opens
its tensor channel to that dense worker and serves steps on a thread
(:class:`~hetis.mesh.tensor_path.AttentionLoop`) until the channel stops. The
channel waits for the next step as long as it must (an idle mesh is fine);
when the dense worker goes away the channel closes and the worker accepts the
next ``Join`` (a restarted dense worker).
"""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Gauge

from hetis.mesh import wire
from hetis.mesh.discovery import Registration
from hetis.mesh.flags import WorkerConfig, describe_device
from hetis.mesh.tensor_path import ATTN, AttentionLoop, connect_store, open_channel
from hetis.model.attention import AttentionBackend, profile_attention
from hetis.model.dense import DTYPES

log = logging.getLogger("hetis.attn_worker")
IDLE_TIMEOUT = 7 * 24 * 3600.0  # a channel may wait this long for the next step (the idle mesh)
KV_USED = Gauge("hetis:kv_used_tokens", "KV cache in use, tokens x head groups", ["worker"])
KV_TOTAL = Gauge("hetis:kv_total_tokens", "KV cache capacity, tokens x head groups", ["worker"])
ATTN_STEPS = Gauge("hetis:attn_steps", "decode/prefill steps served", ["worker"])


class InAnotherGroup(RuntimeError):
    """Join for a tensor group other than the one this worker serves."""


class AttentionWorker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.wid = cfg.worker_id or ""
        self.device = cfg.device
        self.loop: AttentionLoop | None = None
        self.thread: threading.Thread | None = None
        self.group_id = ""
        self.lock = threading.Lock()
        self.registration: Registration | None = None
        self.store = None  # the dense worker's rendezvous store, while a channel is open

    def register(self, port: int) -> None:
        address = f"{self.cfg.advertised}:{port}"
        self.wid = self.cfg.worker_id or f"attn-{address}"
        KV_TOTAL.labels(self.wid).set(self.cfg.kv_tokens)
        self.registration = Registration(self.cfg.redis_url, self.wid, "attention", address,
                                         describe_device(self.device), self.cfg.kv_tokens,
                                         telemetry=self.telemetry).start()

    def join(self, shape: wire.AttentionShape, rv: wire.Rendezvous) -> None:
        """Join a dense worker's tensor group (the same group again is a no-op)."""
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                if rv.group_id == self.group_id:
                    return
                raise InAnotherGroup(f"already in tensor group {self.group_id!r}; restart this "
                                     "worker to join another")
            num_blocks = max(1, self.cfg.kv_tokens // shape.block_size)
            backend = AttentionBackend(shape.num_layers, num_blocks, shape.block_size, shape.head_dim,
                                       shape.q_per_group, DTYPES[shape.dtype], self.device)
            cost = profile_attention(backend)
            self.store = connect_store(rv.master_addr, rv.master_port, timeout=120)
            channel = open_channel(rv.backend, self.store, rv.group_id, ATTN, IDLE_TIMEOUT)
            comm = "cuda" if rv.backend == "nccl" else "cpu"
            self.loop = AttentionLoop(backend, channel, shape.num_layers, cost, comm_device=comm)
            self.group_id = rv.group_id
            self.thread = threading.Thread(target=self._run, name="attention-loop", daemon=True)
            self.thread.start()
            log.info("joined tensor channel %s of %s:%d (%s); cost %.3g s/token, %.3g s/group",
                     rv.group_id, rv.master_addr, rv.master_port, rv.backend, *cost)

    def _run(self) -> None:
        try:
            self.loop.run()
            log.info("tensor group %s stopped", self.group_id)
        except Exception:  # noqa: BLE001 - the dense worker went away: the group is gone
            log.exception("tensor loop ended")

    def telemetry(self) -> dict:
        if self.loop is None:
            return {"kv_used_tokens": 0, "resident": {}, "steps": 0}
        t = self.loop.telemetry()
        KV_USED.labels(self.wid).set(t["kv_used_tokens"])
        ATTN_STEPS.labels(self.wid).set(t["steps"])
        return t

    def stats(self):
        res = self.loop.residency.groups() if self.loop else {}
        return wire.attn_stats_to_proto(self.wid, describe_device(self.device), self.cfg.kv_tokens,
                                        self.loop is not None, self.telemetry(), res)

    def join_response(self):
        return wire.join_response_to_proto(self.wid, self.cfg.kv_tokens, describe_device(self.device))

    def close(self, drain_timeout: float = 30.0) -> None:
        """Drain, then deregister: say we are draining, wait (up to ``drain_timeout``) until
        the router has moved every sequence we hold elsewhere, then leave."""
        if self.registration is None:
            return
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            self.registration.set_draining()
            deadline = time.monotonic() + drain_timeout
            # wait while something still lives here and steps still come (no router, no wait)
            while (self.loop.residency.blocks and time.monotonic() < deadline
                   and time.monotonic() - self.loop.last_seen < 3.0):
                time.sleep(0.1)
            left = len(self.loop.residency.blocks)
            log.info("drained: %s", f"{left} sequences still here after {drain_timeout:.0f} s"
                     if left else "nothing left here")
        self.registration.stop()
