"""Serving instances: several primaries (dense workers) sharing one pool of attention devices.

As in the paper's "Primary workers and their parallelism", each instance is a
dense worker with its own running batch (a :class:`Scheduler`) and its own
device (its local KV); the attention workers are one pool that every instance
can place head groups on. The engine keeps ONE device list and ONE block
manager per device, so an attention worker's KV is accounted once, whoever
fills it, and the dispatcher sees every instance's load on it. An instance
places only on the devices it reaches (``reach``: its own and the attention
workers its dense worker has a channel to).

A request stays on the instance it was given for life (its KV lives there),
unless that instance is lost: then it is recomputed on another one from its
tokens so far (nothing streamed is repeated).

Which instance takes a new request (:func:`pick_instance`): the one whose
predicted wait is smallest, where an instance's wait is its measured seconds
per step times the steps it needs before the request's prefill is done (the
prompt tokens queued ahead of it, this one's included, over the step budget)
stretched by how full its running batch is; an instance whose own device has
no room for the request's whole expected KV counts double (its groups would
all have to go to the pool). Ties go to the instance with fewer requests,
then the lower index, so a burst is dealt out evenly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hetis.engine.block_manager import cdiv
from hetis.engine.scheduler import Chunk, Scheduler
from hetis.engine.sequence import Sequence
from hetis.engine.step import Step


@dataclass
class Instance:
    name: str
    executor: object
    scheduler: Scheduler
    local: int                      # index of its own device in the engine's device list
    reach: set[int] | None = None   # devices it may place on (None: every device)
    lost: bool = False
    steps: int = 0                  # steps executed (cumulative)
    step_s: float | None = None     # EWMA of its step time, seconds
    moves: list = field(default_factory=list)  # planned head-group moves (migration.py)
    migrating: list = field(default_factory=list)  # pre-copies under way (migration.py)

    def observe(self, seconds: float, alpha: float = 0.2) -> None:
        self.steps += 1
        self.step_s = seconds if self.step_s is None else (1 - alpha) * self.step_s + alpha * seconds


@dataclass
class Planned:
    """A step handed out by ``Engine.begin_step``, to be closed by ``Engine.end_step``."""
    instance: int                   # its index when the step began
    owner: Instance                 # that instance (a replacement at the index is another)
    step_id: int
    step: Step
    chunks: list[Chunk]
    preemptions: list[int] = field(default_factory=list)  # each chunk's seq.num_preemptions
    started: float = 0.0
    carried: list = field(default_factory=list)  # the moves it carries (migration.take)


class NoInstance(RuntimeError):
    """No serving instance is alive to take the request."""


def pick_instance(instances: list[Instance], seq: Sequence, managers, block_size: int,
                  groups: int, budget: int, max_seqs: int) -> int:
    """Index of the live instance with the smallest predicted wait for ``seq`` (module doc)."""
    live = [i for i, inst in enumerate(instances) if not inst.lost]
    if not live:
        raise NoInstance("no dense worker is serving; retry when the router reports SERVING")
    known = [instances[i].step_s for i in live if instances[i].step_s]
    default = sum(known) / len(known) if known else 1.0
    need = groups * cdiv(seq.num_tokens + seq.params.max_tokens, block_size)

    def wait(i: int) -> tuple[float, int, int]:
        inst = instances[i]
        sch = inst.scheduler
        queued = sum(s.num_tokens - s.num_computed for s in sch.waiting) + seq.num_tokens
        steps = cdiv(queued, budget) * (1 + len(sch.running) / max_seqs)
        room = len(managers[inst.local].free_blocks) >= need
        return (inst.step_s or default) * steps * (1 if room else 2), len(sch.running) + len(sch.waiting), i
    return min(live, key=wait)
