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
