"""Copies of the engine's state for status pages, taken between steps (plain values)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeviceState:
    """One device as the engine sees it (it owns placement and KV accounting)."""
    used_tokens: int
    total_tokens: int
    load: float                         # predicted attention seconds per step
    cost_per_token: float
    resident: dict[str, list[int]]      # request id -> head groups held
    lost: bool = False                  # dropped from dispatch (died or stopped answering)
    draining: bool = False              # leaving: its groups move away


@dataclass
class InstanceState:
    """One serving instance as the engine sees it."""
    name: str
    running: int
    waiting: int
    steps: int
    lost: bool


@dataclass
class EngineSnapshot:
    """A consistent copy of the engine's state, taken between steps."""
    policy: str
    waiting: int
    running: int
    devices: list[DeviceState]
    instances: list[InstanceState] = field(default_factory=list)
    migrations: int = 0                 # head-group moves done (cumulative)
    migrated_bytes: int = 0             # their KV bytes (cumulative)
    preemptions: int = 0                # sequences recomputed (cumulative)


def take(engine) -> EngineSnapshot:
    """The engine's state now; call it on the thread that steps the engine."""
    rid = {s.seq_id: s.request_id for s in engine.seqs.values()}
    d = engine.dispatcher
    tokens, groups, _ = d.state()
    loads = d.predicted_times(tokens, groups)
    devices = [DeviceState(m.used_tokens, m.capacity_tokens, load, dev.cost_per_token,
                           {rid.get(s, str(s)): gs for s, gs in sorted(m.resident().items())},
                           dev.lost, dev.draining)
               for m, dev, load in zip(engine.managers, d.devices, loads)]
    instances = [InstanceState(i.name, len(i.scheduler.running), len(i.scheduler.waiting),
                               i.steps, i.lost) for i in engine.instances]
    return EngineSnapshot(d.policy, engine.num_waiting, engine.num_running, devices, instances,
                          engine.migrations, engine.migrated_bytes, engine.num_preemptions)
