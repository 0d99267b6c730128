"""The step: one plain value from the scheduler to whatever executes it.

As vLLM's ``SchedulerOutput``, a step says everything an executor needs and
nothing it must look up: which tokens of which sequences to compute
(``chunks``), which attention work each backend does for them (``work``:
backend b's ``AttnItem`` list, item-major in chunk order), which sequences'
KV was freed since the last step (``freed``: backends drop them), and which
head groups' KV moves to another backend first (``moves``).
``hetis.LLM`` hands it to an in-process executor; the router sends it to a
dense worker as one ``StepRequest`` (hetis/mesh/wire.py converts both ways).

An executor is anything with ``execute(step) -> list[int]`` (one sampled token
per chunk with ``sample``, in order) and ``last_times``; one that cannot run a
step raises ``StepFailed``, and the serving loop fails the requests in flight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hetis.engine.sampling import SamplingParams


@dataclass
class AttnItem:
    """One (sequence, head group)'s attention work on one backend in one step."""
    seq_id: int
    group: int
    start: int          # tokens of this (sequence, group) already in the cache
    num_new: int        # tokens appended this step
    blocks: list[int]   # block table; covers start + num_new tokens


@dataclass
class KVMove:
    """One (sequence, head group)'s cached KV moved from backend ``src`` to ``dst`` at the
    start of a step, before its attention: ``num_tokens`` tokens, from ``src_blocks`` into
    ``dst_blocks`` (live migration of head groups; the step's items already use ``dst``)."""
    seq_id: int
    group: int
    src: int
    dst: int
    num_tokens: int
    src_blocks: list[int]
    dst_blocks: list[int]
    partial: bool = False   # a pre-copy chunk: the group stays at src for now (migration.py)


@dataclass
class StepChunk:
    """One sequence's share of a step: tokens [start, start + len(token_ids))."""
    seq_id: int
    start: int
    token_ids: list[int]
    sample: bool = False              # the chunk reaches the last known token: sample one
    params: SamplingParams | None = None  # seeded draws depend on (seed, position) only


@dataclass
class Step:
    chunks: list[StepChunk]
    work: list[list[AttnItem]]        # per backend
    freed: list[int] = field(default_factory=list)
    moves: list[KVMove] = field(default_factory=list)  # done first, in order

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass
class StepTimes:
    """Where an executed step's time went (seconds)."""
    total: float = 0.0
    local_attn: float = 0.0
    exchange_wait: float = 0.0
    move: float = 0.0               # copying migrating head groups' KV, before attention

    @property
    def dense(self) -> float:
        return self.total - self.local_attn - self.exchange_wait - self.move


class StepFailed(RuntimeError):
    """The executor could not run a step (e.g. a dense worker failed it)."""


class DevicesLost(StepFailed):
    """The step failed because these attention devices are gone; nothing else is wrong.

    The engine drops them from dispatch and recomputes the sequences that had head
    groups there (``Engine.lose_devices``); no request fails. ``ran``: the step was
    executed up to its end without them (so its KV moves between other devices were
    done); False when it never started.
    """

    def __init__(self, devices: list[int], message: str, ran: bool = True):
        self.devices, self.ran = list(devices), ran
        super().__init__(message)


class InstanceLost(StepFailed):
    """The step failed because the instance's dense worker is gone (it does not answer).

    The engine drops the instance (``Engine.lose_instance``) and recomputes its
    sequences on the other instances; no request fails.
    """
