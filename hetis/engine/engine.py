"""The engine: scheduler + dispatcher + executor, plus stops (and, in-process, detokenisation).

One object, built one way (:func:`build_engine`) for every caller:
``hetis.LLM`` with an in-process executor and attention backends, the mesh
router with dense workers behind gRPC, the simulator with a cost model. The
engine never learns which: it hands each ``Step`` to ``executor.execute``.

It serves one or more instances (hetis/engine/instance.py): each has its own
scheduler and executor; the devices and their block managers are shared.
:meth:`Engine.step` runs every instance's step in turn (``hetis.LLM``); the
serving loop runs them concurrently with :meth:`Engine.begin_step` and
:meth:`Engine.end_step`, between which the engine's state may change (aborts,
lost devices): blocks freed meanwhile are fenced (hetis/engine/block_manager.py)
and a chunk whose sequence was finished or preempted meanwhile is dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from hetis.defaults import DEFAULT_POLICY
from hetis.engine.block_manager import BlockManager
from hetis.engine.config import EngineConfig
from hetis.engine.detokenize import TextStream
from hetis.engine.dispatcher import Device, Dispatcher
from hetis.engine import migration, redispatch
from hetis.engine.instance import Instance, Planned, pick_instance
from hetis.engine.sampling import SamplingParams
from hetis.engine.scheduler import Scheduler
from hetis.engine.sequence import Sequence, Status
from hetis.engine import snapshot
from hetis.engine.snapshot import EngineSnapshot
from hetis.engine.step import Step, StepChunk
from hetis.model.config import ModelConfig
from hetis.model.tokenizer import Tokenizer


@dataclass
class StepOutput:
    """What a step produced for one sequence (streaming unit).

    The plain fields are values taken when the step produced it, safe to read on
    another thread; ``seq`` is the engine's live object, for the thread that steps it.
    """
    seq: Sequence
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    time: float = field(default_factory=time.monotonic)  # when the step produced it
    request_id: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of(cls, seq: Sequence, new_token_ids: list[int], text_delta: str) -> "StepOutput":
        return cls(seq, new_token_ids, text_delta, seq.finished, request_id=seq.request_id,
                   finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_token_ids),
                   completion_tokens=len(seq.output_token_ids))


class Engine:
    def __init__(self, executor, tokenizer: Tokenizer, managers: list[BlockManager],
                 cfg: EngineConfig, dispatcher: Dispatcher,
                 eos_token_ids: tuple[int, ...] = (), vocab_size: int | None = None,
                 detokenize: bool = True, name: str = "0"):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.detokenize = detokenize  # False: the caller detokenises (and checks stop strings)
        self.managers, self.dispatcher = managers, dispatcher
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.instances: list[Instance] = []
        dispatcher.get_running = lambda: [s for i in self.instances for s in i.scheduler.running]
        self.eos = set(eos_token_ids) | set(tokenizer.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        self.owner: dict[int, int] = {}           # seq_id -> instance index
        self._text: dict[int, TextStream] = {}
        self._inflight: set[int] = set()          # ids of the steps in flight
        self._next_step = 0
        self.migrations = self.migrated_bytes = 0  # head-group moves done (cumulative)
        self.kv_token_bytes = 0                    # KV bytes of one token of one group (all layers)
        self.add_instance(name, executor, local=0)  # instance 0 reaches every device

    @property
    def scheduler(self) -> Scheduler:
        """The first instance's scheduler (the only one in ``hetis.LLM``)."""
        return self.instances[0].scheduler

    @property
    def executor(self):
        return self.instances[0].executor

    # ------------------------------------------------------------ instances
    def add_instance(self, name: str, executor, local: int, reach: set[int] | None = None,
                     index: int | None = None) -> int:
        """A serving instance joins (its own device ``local`` already in the device list;
        ``reach``: the devices it may place on). ``index`` replaces a lost instance: its
        orphaned sequences are adopted. Returns its index; call between steps."""
        inst = Instance(name, executor, None, local, reach)  # type: ignore[arg-type]
        inst.scheduler = Scheduler(
            self.cfg, self.managers, lambda seq: self.dispatcher.place(seq, inst.reach, inst.local),
            busy=self._busy,
            relieve=lambda seq, n, queue: redispatch.relieve(self, self.instances.index(inst), seq, n, queue))
        if index is None:
            self.instances.append(inst)
            index = len(self.instances) - 1
        else:
            old, self.instances[index] = self.instances[index], inst
            inst.scheduler.waiting.extend(old.scheduler.waiting)
            inst.scheduler.freed.extend(old.scheduler.freed)
            inst.scheduler.num_preemptions = old.scheduler.num_preemptions
        self.rehome()
        return index

    def lose_instance(self, index: int) -> list[Sequence]:
        """An instance's dense worker is gone: its device leaves dispatch and its sequences
        are recomputed on the other instances (kept until one is alive). Returns them."""
        inst = self.instances[index]
        inst.lost = True
        self.dispatcher.devices[inst.local].lost = True
        moved = list(reversed(inst.scheduler.running))  # the earliest ends first in line
        for seq in moved:
            inst.scheduler.preempt(seq)
        for seq in inst.scheduler.waiting:
            seq.placement = None
        moved += [s for s in inst.scheduler.waiting if s not in moved]
        self.rehome()
        return moved

    def rehome(self) -> None:
        """Move the sequences of lost instances to live ones (call between steps)."""
        live = [i for i, inst in enumerate(self.instances) if not inst.lost]
        if not live:
            return
        for inst in self.instances:
            if not inst.lost or not (inst.scheduler.waiting or inst.scheduler.freed):
                continue
            # the freed ids still have to reach the attention workers: a live instance says it
            self.instances[live[0]].scheduler.freed.extend(inst.scheduler.freed)
            inst.scheduler.freed.clear()
            while inst.scheduler.waiting:
                seq = inst.scheduler.waiting.pop()  # from the back: the first stays first
                to = self._pick(seq)
                self.owner[seq.seq_id] = to
                self.instances[to].scheduler.waiting.appendleft(seq)

    def _busy(self) -> bool:
        """Something will free memory: a running sequence anywhere, a step in flight, or
        blocks waiting on a fence (a sequence moved off a lost instance waits for them)."""
        return (any(i.scheduler.running for i in self.instances) or bool(self._inflight)
                or any(m.deferred for m in self.managers))

    def _pick(self, seq: Sequence) -> int:
        c = self.cfg
        return pick_instance(self.instances, seq, self.managers, c.block_size, self.dispatcher.G,
                             c.max_num_batched_tokens, c.max_num_seqs)

    def _sched(self, seq: Sequence) -> Scheduler:
        return self.instances[self.owner.get(seq.seq_id, 0)].scheduler

    num_waiting = property(lambda self: sum(len(i.scheduler.waiting) for i in self.instances))
    num_running = property(lambda self: sum(len(i.scheduler.running) for i in self.instances))

    @property
    def num_preemptions(self) -> int:
        return sum(i.scheduler.num_preemptions for i in self.instances)

    # ------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> Sequence:
        if request_id in self.seqs:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.cfg.max_model_len:
            raise ValueError(f"prompt: {len(prompt_token_ids)} tokens leave no room under "
                             f"max_model_len={self.cfg.max_model_len}")
        seq = Sequence(request_id, list(prompt_token_ids), params, prompt=prompt,
                       arrival=time.monotonic())
        to = self._pick(seq)  # NoInstance when none is alive
        self.seqs[request_id] = seq
        self.owner[seq.seq_id] = to
        if self.detokenize:
            self._text[seq.seq_id] = TextStream(self.tokenizer, seq.prompt_token_ids, params)
        self.instances[to].scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its KV is freed on every backend."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if not seq.finished:
            self._sched(seq).finish(seq, "abort")
        self._text.pop(seq.seq_id, None)
        self.owner.pop(seq.seq_id, None)
        return True

    def has_unfinished(self) -> bool:
        return any(i.scheduler.has_unfinished() for i in self.instances)

    def release(self, seq: Sequence) -> None:
        """Forget a finished sequence (the caller has taken its output)."""
        self.seqs.pop(seq.request_id, None)
        self._text.pop(seq.seq_id, None)
        self.owner.pop(seq.seq_id, None)

    # ------------------------------------------------------------ the step
    def step(self) -> list[StepOutput]:
        """Every live instance's step, one after the other (in-process use)."""
        outs: list[StepOutput] = []
        for i, inst in enumerate(self.instances):
            if inst.lost:
                continue
            planned, rejected = self.begin_step(i)
            outs += rejected
            if planned is None:
                continue
            try:
                toks = inst.executor.execute(planned.step)
            except BaseException:
                self.end_step(planned, None)
                raise
            outs += self.end_step(planned, toks)
        return outs

    def begin_step(self, index: int) -> tuple[Planned | None, list[StepOutput]]:
        """Schedule instance ``index``'s next step: (the step to execute, or None when it
        has nothing to do; outputs of sequences refused as never fitting). A step with no
        chunks only carries freed sequence ids. Close it with :meth:`end_step`."""
        inst = self.instances[index]
        migration.advance(self, index)  # pre-copies first: they are under way
        every = self.cfg.migrate_every
        if every and inst.steps and inst.steps % every == 0:
            migration.force_one(self, index)
        if any(d.draining for d in self.dispatcher.devices):
            redispatch.drain(self, index)
        redispatch.rebalance(self, index)
        chunks = inst.scheduler.schedule()
        # sequences the scheduler gave up on (they can never fit) surface as finished
        outs = [StepOutput.of(s, [], "") for s in inst.scheduler.rejected]
        inst.scheduler.rejected.clear()
        freed, inst.scheduler.freed = inst.scheduler.freed, []
        moves, carried = migration.take(inst)
        if not chunks and not freed and not moves:
            return None, outs
        step = Step([StepChunk(c.seq.seq_id, c.start, c.seq.tokens(c.start, c.start + c.num_new),
                               c.sample, c.seq.params) for c in chunks],
                    inst.scheduler.items(chunks), freed, moves)
        planned = Planned(index, inst, self._next_step, step, chunks,
                          [c.seq.num_preemptions for c in chunks], time.monotonic(), carried)
        self._next_step += 1
        self._inflight.add(planned.step_id)
        self._fence()
        return planned, outs

    def end_step(self, planned: Planned, tokens: list[int] | None,
                 lost: set[int] | None = None) -> list[StepOutput]:
        """Close a step: ``tokens`` as ``execute`` returned them, or None when it failed
        (its chunks are computed again by a later step; ``lost``: it ran to its end without
        these devices, so its other KV moves were done)."""
        self._inflight.remove(planned.step_id)
        self._fence()
        inst = planned.owner
        migration.settle(self, inst, planned.carried, ok=tokens is not None, lost=lost)
        if tokens is None:
            return []
        if planned.chunks:
            inst.observe(time.monotonic() - planned.started)
        outs = []
        now = time.monotonic()
        toks = iter(tokens)
        for c, n in zip(planned.chunks, planned.preemptions):
            tok = next(toks) if c.sample else None
            seq = c.seq
            # finished, aborted, preempted or moved while the step ran: its result is void
            if seq.status is not Status.RUNNING or seq.num_preemptions != n:
                continue
            seq.num_computed = c.start + c.num_new
            if tok is not None:
                if seq.first_token_time is None:
                    seq.first_token_time = now
                outs.append(self._append(seq, tok))
        return outs

    def _fence(self) -> None:
        """Blocks freed while steps are in flight wait for them (block_manager.py)."""
        safe = min(self._inflight) if self._inflight else None
        fence = max(self._inflight) if self._inflight else None
        for m in self.managers:
            m.release(safe)
            m.fence = fence

    def lose_devices(self, devices: list[int]) -> list[Sequence]:
        """Drop devices from dispatch; every sequence with a head group there is recomputed
        elsewhere (its output so far kept: nothing is streamed twice). Returns those."""
        for b in devices:
            self.dispatcher.devices[b].lost = True
        gone = set(devices)
        moved = []
        for inst in self.instances:
            for seq in reversed(list(inst.scheduler.running)):  # the earliest ends first in line
                if seq.placement and gone & set(seq.placement):
                    inst.scheduler.preempt(seq)
                    moved.append(seq)
            for seq in inst.scheduler.waiting:  # placed but not yet admitted
                if seq.placement and gone & set(seq.placement):
                    seq.placement = None
        for b in devices:  # whatever is left there is gone with the device
            for sid in list(self.managers[b].resident()):
                self.managers[b].free(sid)
        return moved

    def drain_device(self, index: int) -> list[Sequence]:
        """A device is leaving: nothing new goes there, and each instance moves its groups
        away with its next steps (redispatch.drain); without executors that move KV it is
        lost at once (its sequences recomputed, and returned)."""
        if not any(migration.can_move(i) for i in self.instances if not i.lost):
            return self.lose_devices([index])
        self.dispatcher.devices[index].draining = True
        for seq in (s for i in self.instances for s in i.scheduler.waiting):
            if seq.placement and index in seq.placement:  # placed, not admitted: placed again
                seq.placement = None
        return []

    def add_device(self, device: Device, index: int | None = None) -> int:
        """A device joins dispatch: a new index, or (``index``) a lost one that came back
        (its blocks all free). Returns its index; call between steps."""
        manager = BlockManager(device.capacity_blocks, self.cfg.block_size)
        if index is None:
            self.dispatcher.devices.append(device)
            self.managers.append(manager)
            return len(self.managers) - 1
        # blocks still fenced on the old one may be written by a step in flight: keep them so
        held = {b for _, blocks in self.managers[index].deferred for b in blocks}
        if held:
            manager.free_blocks = [b for b in manager.free_blocks if b not in held]
            manager.deferred = list(self.managers[index].deferred)
        self.dispatcher.devices[index] = device
        self.managers[index] = manager
        return index

    def snapshot(self) -> EngineSnapshot:
        """Placement, KV and load per device; call it on the thread that steps the engine."""
        return snapshot.take(self)

    def _append(self, seq: Sequence, tok: int) -> StepOutput:
        seq.output_token_ids.append(tok)
        p = seq.params
        text = self._text.get(seq.seq_id)
        reason = None
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"  # the stop token's text is not added
        elif text is not None and text.feed(tok):
            reason = "stop"
        elif (len(seq.output_token_ids) >= p.max_tokens
              or seq.num_tokens >= self.cfg.max_model_len):
            reason = "length"
        if reason is not None:
            self._sched(seq).finish(seq, reason)
        delta = ""
        if text is not None:
            delta = text.delta(final=reason is not None)
            seq.text = text.text
        return StepOutput.of(seq, [tok], delta)

    def run_to_completion(self, progress: Callable[[int], None] | None = None) -> None:
        while self.has_unfinished():
            for o in self.step():
                if o.finished and progress:
                    progress(1)


def build_engine(executor, tokenizer: Tokenizer, model: ModelConfig, cfg: EngineConfig,
                 devices: list[Device], policy: str = DEFAULT_POLICY,
                 pinned: list[int] | None = None, kv_bytes: int = 4,
                 detokenize: bool = True) -> Engine:
    """The one way to assemble an engine, for ``hetis.LLM``, the router and the simulator.

    ``devices[i]`` is attention backend i of ``executor`` (0: the dense side's
    own); each gets a block manager of its ``capacity_blocks``. ``kv_bytes``
    is the element size of the tensors attention exchanges (the dispatcher's
    transfer cost per head-group row: q and output out and back, k and v out).
    ``detokenize=False`` leaves text and stop strings to the caller (the router
    does them per stream on its event loop, with a ``TextStream``).
    """
    managers = [BlockManager(d.capacity_blocks, cfg.block_size) for d in devices]
    row_bytes = (2 * model.q_per_group + 2) * model.head_dim * kv_bytes
    dispatcher = Dispatcher(devices, model.num_groups, model.num_layers, cfg.block_size,
                            cfg.max_model_len, row_bytes, policy=policy, pinned=pinned,
                            headroom=cfg.kv_headroom)
    engine = Engine(executor, tokenizer, managers, cfg, dispatcher,
                    eos_token_ids=model.eos_token_ids, vocab_size=model.vocab_size,
                    detokenize=detokenize)
    engine.kv_token_bytes = 2 * model.head_dim * kv_bytes * model.num_layers
    return engine
