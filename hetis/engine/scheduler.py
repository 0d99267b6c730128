"""Continuous batching: which sequences run in the next step, and how much.

Each step has a token budget (``max_num_batched_tokens``). Running sequences
go first, in arrival order: a decode costs one token, an unfinished prompt a
chunk of whatever budget is left (chunked prefill). Waiting sequences are then
admitted while budget, ``max_num_seqs`` and KV memory allow; admission asks
``place(seq)`` for the sequence's head-group placement (the dispatcher), which
may answer None: not now. When a running sequence cannot grow its KV on a
device, ``relieve`` (re-dispatch, hetis/engine/redispatch.py) may move head
groups to make room; otherwise a victim is preempted by recompute: the
latest-arrived sequence using that device among those not yet scheduled in
this step (the sequence itself at the latest). Its blocks are freed and it
goes back to the front of the queue with its tokens so far.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from hetis.engine.block_manager import BlockManager, groups_by_device
from hetis.engine.config import EngineConfig
from hetis.engine.sequence import Sequence, Status
from hetis.engine.step import AttnItem


@dataclass
class Chunk:
    seq: Sequence
    start: int      # first token position computed in this step
    num_new: int

    @property
    def sample(self) -> bool:
        """True when the chunk reaches the last known token: a new token follows."""
        return self.start + self.num_new == self.seq.num_tokens


def groups_on(placement: list[int], backend: int) -> list[int]:
    return [g for g, b in enumerate(placement) if b == backend]


class Scheduler:
    def __init__(self, cfg: EngineConfig, managers: list[BlockManager],
                 place: Callable[[Sequence], list[int] | None],
                 busy: Callable[[], bool] | None = None, relieve: Callable | None = None):
        self.cfg, self.managers, self.place = cfg, managers, place
        # (seq, num_tokens, queue) -> "retry" | "wait" | the sequence to preempt
        self.relieve = relieve or self._victim
        # whether anything runs that will free memory (with several instances sharing
        # devices, theirs count too): a waiting sequence that fits nowhere while nothing
        # runs can never fit, and is refused
        self.busy = busy or (lambda: bool(self.running))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.rejected: list[Sequence] = []  # finished because they can never fit
        self.freed: list[int] = []          # seq ids whose KV was freed (for remote workers)

    # ------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence wherever it is and free its KV everywhere."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self._free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ------------------------------------------------------------ memory
    def needs(self, seq: Sequence, num_tokens: int):
        """(device, its manager, seq's groups there, tokens) for each device seq uses, the
        devices in ascending order."""
        for b, gs in groups_by_device(seq.placement).items():
            yield b, self.managers[b], gs, num_tokens

    def _can_alloc(self, seq: Sequence, num_tokens: int) -> bool:
        return all(m.can_allocate(seq.seq_id, gs, n) for _, m, gs, n in self.needs(seq, num_tokens))

    def _alloc(self, seq: Sequence, num_tokens: int) -> None:
        for _, m, gs, n in self.needs(seq, num_tokens):
            m.allocate(seq.seq_id, gs, n)

    def _victim(self, seq: Sequence, num_tokens: int, queue: list[Sequence]) -> Sequence:
        """The sequence to preempt so ``seq`` can grow (module doc)."""
        short = {b for b, m, gs, n in self.needs(seq, num_tokens) if not m.can_allocate(seq.seq_id, gs, n)}
        users = [s for s in queue if short & set(s.placement or ())]
        return max(users + [seq], key=lambda s: (s.arrival, s.seq_id))

    def _free(self, seq: Sequence) -> None:
        if seq.placement is not None:
            self.freed.append(seq.seq_id)
        for m in self.managers:
            m.free(seq.seq_id)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV everywhere and queue it first, to recompute its tokens."""
        self._free(seq)
        if seq in self.running:
            self.running.remove(seq)
        seq.num_computed = 0
        seq.placement = None  # re-placed on readmission, with the load of that moment
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------ the step
    def schedule(self) -> list[Chunk]:
        budget = self.cfg.max_num_batched_tokens
        chunks: list[Chunk] = []
        queue = list(self.running)
        kept: list[Sequence] = []
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._can_alloc(seq, seq.num_computed + n):
                victim = self.relieve(seq, seq.num_computed + n, queue)
                if victim == "retry":
                    continue
                if victim == "wait":  # room comes once this step's moves are done
                    kept.append(seq)
                    break
                if victim is not seq:
                    queue.remove(victim)
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self._alloc(seq, seq.num_computed + n)
                chunks.append(Chunk(seq, seq.num_computed, n))
                kept.append(seq)
                budget -= n
        self.running = kept + queue

        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq.placement is None:
                seq.placement = self.place(seq)
                if seq.placement is None:
                    if not self.busy():  # nothing will ever free room for it
                        self.waiting.popleft()
                        self.finish(seq, "length")
                        self.rejected.append(seq)
                        continue
                    break
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._can_alloc(seq, n):
                if not self.busy():
                    # nothing will ever free memory for it: it cannot run here
                    self.waiting.popleft()
                    self.finish(seq, "length")
                    self.rejected.append(seq)
                    continue
                break
            self.waiting.popleft()
            self._alloc(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
        return chunks

    def items(self, chunks: list[Chunk]) -> list[list[AttnItem]]:
        """The step's attention work per backend, item-major in chunk order."""
        per: list[list[AttnItem]] = [[] for _ in self.managers]
        tables = [m.tables for m in self.managers]
        for c in chunks:
            sid, start, n = c.seq.seq_id, c.start, c.num_new
            for b, gs in groups_by_device(c.seq.placement).items():
                tb = tables[b]
                per[b] += [AttnItem(sid, g, start, n, tb[(sid, g)]) for g in gs]
        return per
