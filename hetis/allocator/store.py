"""The allocator's state in Redis, so it survives restarts.

Key schema (prefix default ``hetis:allocator:``):
  {prefix}inventory    hash   GPU type -> count
  {prefix}prices       hash   GPU type -> public exchange price (optional)
  {prefix}tenants      hash   tenant name -> JSON TenantSpec (name, weight, throughput,
                              max_gpus, jobs, job_type, scale_factor)
  {prefix}version      string integer, INCR on every change of inventory or tenants
  {prefix}rounds       string JSON rounds state (round, cumulative targets and grants,
                              placements and leases)
  {prefix}allocation   string JSON of the last fractional allocation
                              {mode, version, tenants, gpu_types, x, solve_seconds}
Writes that change state and bump the version run in one MULTI/EXEC transaction.
"""
from __future__ import annotations

import json

import redis

from .spec import TenantSpec

PREFIX = "hetis:allocator:"


class Store:
    def __init__(self, url: str, prefix: str = PREFIX):
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.k = lambda name: prefix + name

    def ping(self) -> None:
        self.r.ping()

    def version(self) -> int:
        return int(self.r.get(self.k("version")) or 0)

    def set_inventory(self, gpus: dict[str, int], prices: dict[str, float] | None) -> int:
        p = self.r.pipeline(transaction=True)
        p.delete(self.k("inventory"), self.k("prices"))
        if gpus:
            p.hset(self.k("inventory"), mapping=gpus)
        if prices:
            p.hset(self.k("prices"), mapping=prices)
        p.incr(self.k("version"))
        return int(p.execute()[-1])

    def inventory(self) -> tuple[dict[str, int], dict[str, float]]:
        gpus = {k: int(v) for k, v in sorted(self.r.hgetall(self.k("inventory")).items())}
        prices = {k: float(v) for k, v in self.r.hgetall(self.k("prices")).items()}
        return gpus, prices

    def upsert_tenant(self, t: TenantSpec) -> tuple[int, bool]:
        p = self.r.pipeline(transaction=True)
        p.hset(self.k("tenants"), t.name, json.dumps(t.to_dict()))
        p.incr(self.k("version"))
        created, version = p.execute()
        return int(version), bool(created)

    def remove_tenant(self, name: str) -> int | None:
        """The new version, or None if there was no such tenant."""
        if not self.r.hexists(self.k("tenants"), name):
            return None
        p = self.r.pipeline(transaction=True)
        p.hdel(self.k("tenants"), name)
        p.incr(self.k("version"))
        return int(p.execute()[-1])

    def tenants(self) -> list[TenantSpec]:
        out = []
        for name, raw in sorted(self.r.hgetall(self.k("tenants")).items()):
            d = json.loads(raw)
            out.append(TenantSpec(d["name"], d["throughput"], d["weight"], d["max_gpus"],
                                  [(j["id"], j["gpus"]) for j in d["jobs"]], d["job_type"], d["scale_factor"]))
        return out

    def save_json(self, key: str, value: dict) -> None:
        self.r.set(self.k(key), json.dumps(value))

    def load_json(self, key: str) -> dict | None:
        raw = self.r.get(self.k(key))
        return None if raw is None else json.loads(raw)

    def close(self) -> None:
        self.r.close()
