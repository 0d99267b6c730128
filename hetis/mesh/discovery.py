"""Redis: discovery, liveness and telemetry of the mesh. Never on the per-layer path.

Key schema (all keys under the prefix ``hetis:``, configurable for shared Redis):

=================================  ======  ==========================================
key                                type    contents
=================================  ======  ==========================================
``hetis:workers``                  set     ids of every registered worker
``hetis:worker:{id}``              hash    kind ("dense"|"attention"), address (gRPC
                                           host:port), device, kv_tokens (capacity in
                                           tokens x head groups), pid, started (unix s),
                                           draining ("1" once it is shutting down)
``hetis:alive:{id}``               string  heartbeat; expires after ``ttl`` seconds
                                           (default 6 s, refreshed every ttl/3)
``hetis:telemetry:{id}``           hash    kv_used_tokens, resident (JSON
                                           {seq_id: [groups]}), cost_per_token and
                                           cost_per_group (attention seconds per
                                           layer-step: per token x group read, per
                                           group), steps, updated (unix s)
=================================  ======  ==========================================

A worker whose ``alive`` key has expired is dead to the router; its other keys
stay until it deregisters or another worker registers under the same id. A
worker whose record is gone (Redis restarted without persistence, or flushed)
registers again at its next heartbeat, so the mesh's view recovers within
``ttl / 3`` of Redis coming back; a worker that starts while Redis is down
registers as soon as it is reachable.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import redis

from hetis.engine.step import AttnItem

log = logging.getLogger("hetis.discovery")
PREFIX = os.environ.get("HETIS_REDIS_PREFIX", "hetis")


def k_workers() -> str:
    return f"{PREFIX}:workers"


def k_worker(wid: str) -> str:
    return f"{PREFIX}:worker:{wid}"


def k_alive(wid: str) -> str:
    return f"{PREFIX}:alive:{wid}"


def k_telemetry(wid: str) -> str:
    return f"{PREFIX}:telemetry:{wid}"


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                socket_connect_timeout=5, health_check_interval=30)


class Registration:
    """Register a worker, heartbeat in the background, publish telemetry."""

    def __init__(self, url: str, wid: str, kind: str, address: str, device: str, kv_tokens: int,
                 ttl: float = 6.0, telemetry=None):
        self.r, self.wid, self.ttl = connect(url), wid, ttl
        self.telemetry = telemetry  # callable -> dict, published with each heartbeat
        self.info = {"kind": kind, "address": address, "device": device, "kv_tokens": kv_tokens,
                     "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{wid}", daemon=True)

    def start(self) -> "Registration":
        try:
            self._register(fresh=True)
        except redis.RedisError as e:  # the heartbeat registers once Redis answers
            log.warning("registering %s failed (will retry): %s", self.wid, e)
        self._thread.start()
        return self

    def _register(self, fresh: bool = False) -> None:
        p = self.r.pipeline()
        if fresh:  # a previous life's telemetry under this id is not ours
            p.delete(k_worker(self.wid), k_telemetry(self.wid))
        p.hset(k_worker(self.wid), mapping=self.info)
        p.sadd(k_workers(), self.wid)
        p.set(k_alive(self.wid), "1", px=int(self.ttl * 1000))
        p.execute()

    def set_draining(self) -> None:
        """Say this worker is shutting down: the router places nothing new on it and moves
        what it holds elsewhere."""
        self.info["draining"] = "1"
        try:
            self.r.hset(k_worker(self.wid), "draining", "1")
        except redis.RedisError as e:
            log.warning("could not mark %s draining: %s", self.wid, e)

    def publish(self, fields: dict) -> None:
        data = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in fields.items()}
        data["updated"] = time.time()
        self.r.hset(k_telemetry(self.wid), mapping=data)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                p = self.r.pipeline()
                p.set(k_alive(self.wid), "1", px=int(self.ttl * 1000))
                p.exists(k_worker(self.wid))
                p.sismember(k_workers(), self.wid)
                _, has_record, listed = p.execute()
                if not (has_record and listed):
                    self._register()
                    log.info("re-registered %s (its Redis record was gone)", self.wid)
                if self.telemetry is not None:
                    self.publish(self.telemetry())
            except redis.RedisError as e:  # Redis down: keep serving, retry next beat
                log.warning("heartbeat for %s failed: %s", self.wid, e)

    def stop(self) -> None:
        self._stop.set()
        try:
            p = self.r.pipeline()
            p.delete(k_alive(self.wid), k_worker(self.wid), k_telemetry(self.wid))
            p.srem(k_workers(), self.wid)
            p.execute()
        except redis.RedisError:
            pass


def read_workers(r: redis.Redis) -> list[dict]:
    """Every registered worker with its liveness and latest telemetry."""
    ids = sorted(r.smembers(k_workers()))
    p = r.pipeline()
    for wid in ids:
        p.hgetall(k_worker(wid))
        p.exists(k_alive(wid))
        p.hgetall(k_telemetry(wid))
    res = p.execute()
    out = []
    for i, wid in enumerate(ids):
        info, alive, tel = res[3 * i: 3 * i + 3]
        if not info:
            continue
        w = {"id": wid, "alive": bool(alive), **info}
        w["kv_tokens"] = int(w.get("kv_tokens", 0))
        w["draining"] = w.get("draining") == "1"
        for key in ("kv_used_tokens", "steps"):
            w[key] = int(float(tel.get(key, 0)))
        for key in ("cost_per_token", "cost_per_group"):
            w[key] = float(tel.get(key, 0.0))
        w["resident"] = {int(s): g for s, g in json.loads(tel.get("resident", "{}")).items()}
        out.append(w)
    return out


class Residency:
    """What a device holds, as seen from the layouts it executes (for telemetry).

    Thread-safe: an attention worker's channels (one per dense worker) share one."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: dict[int, dict[int, int]] = {}  # seq_id -> group -> blocks
        self._lock = threading.Lock()

    def update(self, items: list[AttnItem], freed=()) -> None:
        with self._lock:
            for s in freed:
                self.blocks.pop(s, None)
            for it in items:
                self.blocks.setdefault(it.seq_id, {})[it.group] = len(it.blocks)

    def drop(self, seq_ids) -> None:
        with self._lock:
            for s in seq_ids:
                self.blocks.pop(s, None)

    def drop_group(self, seq_id: int, group: int) -> None:
        """One head group left (migrated to another device)."""
        with self._lock:
            gs = self.blocks.get(seq_id, {})
            gs.pop(group, None)
            if not gs:
                self.blocks.pop(seq_id, None)

    @property
    def used_tokens(self) -> int:
        with self._lock:
            return sum(n for gs in self.blocks.values() for n in gs.values()) * self.block_size

    def groups(self) -> dict[int, list[int]]:
        with self._lock:
            return {s: sorted(gs) for s, gs in self.blocks.items()}
