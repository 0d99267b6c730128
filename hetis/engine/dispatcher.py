"""The head dispatcher: where each request's KV-head groups live.

Devices are the dense worker's own device (index 0) and the attention workers
(1..N). Each has a cost model, profiled at start and refined online::

    attention time per step = layers * (cost_per_token * tokens read + cost_per_group * groups)
    transfer time per step  = layers * (latency + groups * bytes per group-row / bandwidth)
                              (remote devices only, and only when they hold any group)

Policy ``hetis`` (the default, the paper's online dispatcher): for a new request,
place its groups one at a time on the device whose predicted time after taking
the group is smallest — a greedy minimisation of the predicted makespan (the
slowest device decides the step) — among the devices with room for the
group's reservation in blocks. By default that is the whole expected KV
(prompt + max_tokens), so a placed request never runs a device out of KV;
with ``headroom`` (``--kv-headroom``) it is what the request holds now plus
that many tokens, as the paper admits, and a device that runs short later is
relieved by re-dispatch (hetis/engine/redispatch.py). When no device has room
the request waits (``place`` returns None). Draining devices take nothing new.
``local-only`` keeps every group on device 0; ``round-robin`` deals groups to
devices in turn. Both respect the same memory reservation.

A ``pinned`` placement (``hetis.LLM(placement=[...])``) bypasses the policy:
every request gets that placement and no reservation; the scheduler then
checks memory block by block and preempts by recompute when a device runs out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from hetis.defaults import POLICIES
from hetis.engine.block_manager import cdiv, groups_by_device
from hetis.engine.sequence import Sequence


@dataclass
class Device:
    name: str
    capacity_blocks: int
    cost_per_token: float = 1e-8      # s per token x group read, per layer
    cost_per_group: float = 1e-6      # s per group, per layer
    remote: bool = False
    latency: float = 0.0              # s per layer exchange
    bandwidth: float = float("inf")   # bytes/s
    lost: bool = False                # gone (died, or stopped answering): never placed on again
    draining: bool = False            # leaving: nothing new is placed here, what is here moves away

    @property
    def usable(self) -> bool:
        return not self.lost and not self.draining

    def time(self, tokens: int, groups: int, row_bytes: float, layers: int) -> float:
        t = self.cost_per_token * tokens + self.cost_per_group * groups
        if self.remote and groups:
            t += self.latency + groups * row_bytes / self.bandwidth
        return layers * t


class Dispatcher:
    def __init__(self, devices: list[Device], num_groups: int, num_layers: int, block_size: int,
                 max_model_len: int, row_bytes: float, policy: str = "hetis",
                 pinned: list[int] | None = None, headroom: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES} (got {policy!r})")
        if pinned is not None and (len(pinned) != num_groups
                                   or any(not 0 <= d < len(devices) for d in pinned)):
            raise ValueError(f"placement: needs {num_groups} device indices in "
                             f"[0, {len(devices)}) (got {pinned!r})")
        self.devices, self.G, self.L = devices, num_groups, num_layers
        self.block_size, self.max_model_len = block_size, max_model_len
        self.row_bytes, self.policy, self.pinned = row_bytes, policy, pinned
        if headroom is not None and headroom < 0:
            raise ValueError(f"kv_headroom: must be >= 0 tokens (got {headroom})")
        self.headroom = headroom
        # the scheduler's running sequences; the owner points this at its scheduler
        self.get_running: Callable[[], Iterable[Sequence]] = lambda: ()
        self._rr = 0

    def expected_len(self, seq: Sequence) -> int:
        """The tokens reserved for ``seq`` per head group (module doc)."""
        left = max(seq.params.max_tokens - len(seq.output_token_ids), 0)
        if self.headroom is not None:
            left = min(left, self.headroom)
        return min(seq.num_tokens + left, self.max_model_len)

    def state(self, exclude: Sequence | None = None):
        """Per device: (tokens read per step, groups, reserved blocks) of running sequences."""
        n = len(self.devices)
        tokens, groups, reserved = [0] * n, [0] * n, [0] * n
        for s in list(self.get_running()):
            if s is exclude or s.placement is None:
                continue
            blocks = cdiv(self.expected_len(s), self.block_size)
            t = s.num_tokens
            for d, gs in groups_by_device(s.placement).items():  # per device, not per group
                k = len(gs)
                tokens[d] += k * t
                groups[d] += k
                reserved[d] += k * blocks
        return tokens, groups, reserved

    def predicted_times(self, tokens, groups) -> list[float]:
        return [dev.time(t, g, self.row_bytes, self.L)
                for dev, t, g in zip(self.devices, tokens, groups)]

    def place(self, seq: Sequence, allowed: set[int] | None = None,
              local: int = 0) -> list[int] | None:
        """The new sequence's placement (head group -> device), or None: not now.

        With several serving instances, ``allowed`` is the devices the sequence's
        instance reaches (its own and the attention workers it is connected to) and
        ``local`` its own device; the load and reservations of every instance's
        sequences count (``get_running`` returns them all)."""
        if self.pinned is not None:
            return list(self.pinned)
        tokens, groups, reserved = self.state(exclude=seq)
        need = cdiv(self.expected_len(seq), self.block_size)
        free = [d.capacity_blocks - r for d, r in zip(self.devices, reserved)]
        n = len(self.devices)
        live = [i for i in range(n) if self.devices[i].usable and (allowed is None or i in allowed)]
        if not live:
            return None
        placement = []
        for g in range(self.G):
            fits = [i for i in live if free[i] >= need]
            if not fits:
                return None
            if self.policy == "local-only":
                d = local if local in fits else None
            elif self.policy == "round-robin":  # the next live device in turn
                d = live[(self._rr + g) % len(live)]
                d = d if d in fits else None
            else:
                d = min(fits, key=lambda i: (self.devices[i].time(
                    tokens[i] + seq.num_tokens, groups[i] + 1, self.row_bytes, self.L), i))
            if d is None:
                return None
            placement.append(d)
            tokens[d] += seq.num_tokens
            groups[d] += 1
            free[d] -= need
        if self.policy == "round-robin":
            self._rr = (self._rr + self.G) % len(self.devices)
        return placement
