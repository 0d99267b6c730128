"""Live migration of head groups: a running sequence's group moves to another device.

The mechanism; the policy that decides what moves where is the paper's
re-dispatch (hetis/engine/redispatch.py). Moves are planned only between two
steps of the sequence's own instance (in ``Engine.begin_step``):

- :func:`plan` allocates the group's blocks on the destination for the tokens
  already cached, points the sequence's placement at it and queues a
  :class:`~hetis.engine.step.KVMove` on its instance. Accounting switches owner
  here, between two steps: from now on the dispatcher counts the group on the
  destination and the scheduler grows it there.
- The instance's next step carries the move (:func:`take`); the executor copies
  the blocks first, before any attention of that step, so the step's own items
  (already on the destination) read the moved KV. The source blocks stay the
  sequence's until that step has ended (:func:`settle`), so nobody else writes
  them while they are read (with several instances, other steps run meanwhile).
- If the step fails, whether the copy happened is unknown: the sequence is
  preempted (recomputed from its tokens so far, nothing streamed twice). A
  sequence preempted or finished before its move went out simply drops it.

Only whole groups move, and only the groups whose device changes. A step
carries at most ``EngineConfig.max_move_tokens`` of KV (tokens x groups), so
the copy a step waits for is bounded. A move that is not urgent (compute
balance, drain) and is larger than what the step has left is **pre-copied**,
as VM live migration does: its destination blocks are allocated at once, and
each step copies the next full blocks (full blocks never change again) while
the sequence keeps attending at the source; when what is left fits the step's
budget, the last chunk goes with the switch of owner as above. An urgent move
(a device out of KV: re-dispatch's KV balance) goes whole with the next step,
with a budget of its own: a step carries at most twice the budget, or one
urgent group larger than that. The executor in
``hetis.LLM`` copies between its in-process backends; over the mesh the dense
worker pulls the KV from the source's tensor channel and pushes it down the
destination's (hetis/mesh/tensor_path.py) before the step's layouts go out.
An executor that cannot copy (``supports_moves`` false) gets no moves: the
policy falls back to preemption.
"""
from __future__ import annotations

from dataclasses import dataclass

from hetis.engine.sequence import Sequence, Status
from hetis.engine.step import KVMove


@dataclass
class Precopy:
    """A group being copied ahead of its move (module doc): ``copied`` blocks are there."""
    seq: Sequence
    preemptions: int
    group: int
    src: int
    dst: int
    copied: int = 0


def can_move(inst) -> bool:
    return bool(getattr(inst.executor, "supports_moves", False))


def budget_left(engine, inst, urgent: bool = False) -> int:
    """KV tokens (x groups) the instance's next step may still carry (module doc). Urgent
    moves have a budget of their own (pre-copy chunks do not count against it), so a step
    carries at most twice the budget, or one urgent group larger than that."""
    return engine.cfg.max_move_tokens - sum(c[2].num_tokens for c in inst.moves
                                            if not (urgent and c[2].partial))


def moving(inst, seq: Sequence, group: int) -> bool:
    return (any(c[0] is seq and c[2].group == group and not c[2].partial for c in inst.moves)
            or any(p.seq is seq and p.group == group for p in inst.migrating))


def plan(engine, index: int, seq: Sequence, group: int, dst: int, urgent: bool = True) -> bool:
    """Move ``seq``'s ``group`` to device ``dst``: whole with the next step of instance
    ``index`` when ``urgent`` or small enough, else pre-copied over the next steps. False
    when it cannot (not running, nothing cached, same device, no room, not reachable,
    draining, already moving, over the step's budget, or an executor that cannot copy)."""
    inst = engine.instances[index]
    src = seq.placement[group] if seq.placement else None
    dev = engine.dispatcher.devices[dst] if 0 <= dst < len(engine.managers) else None
    n = seq.num_computed
    left = budget_left(engine, inst, urgent)
    whole = urgent or n <= left
    first = not any(not c[2].partial for c in inst.moves)  # one whole move always goes
    if (seq.status is not Status.RUNNING or not n or src is None or src == dst
            or dev is None or not dev.usable or (inst.reach is not None and dst not in inst.reach)
            or not can_move(inst) or (whole and not first and left < n)
            or moving(inst, seq, group)):
        return False
    dm = engine.managers[dst]
    if not dm.can_allocate(seq.seq_id, [group], n):
        return False
    dm.allocate(seq.seq_id, [group], n)
    seq.moved_at = engine._next_step
    if whole:
        _switch(engine, inst, seq, seq.num_preemptions, group, src, dst, 0)
    else:
        inst.migrating.append(Precopy(seq, seq.num_preemptions, group, src, dst))
    return True


def _switch(engine, inst, seq: Sequence, preemptions: int, group: int, src: int, dst: int,
            copied: int) -> None:
    """The move itself: the rest of the group's KV (from block ``copied`` on) goes with the
    next step, and the group is the destination's from now on."""
    sid = seq.seq_id
    move = KVMove(sid, group, src, dst, seq.num_computed - copied * engine.cfg.block_size,
                  list(engine.managers[src].table(sid, group))[copied:],
                  list(engine.managers[dst].table(sid, group))[copied:])
    seq.placement[group] = dst
    inst.moves.append((seq, preemptions, move, None))


def hurry(engine, inst, seq: Sequence, group: int) -> bool:
    """An urgent move of a group being pre-copied: the rest goes whole with the next step."""
    for p in inst.migrating:
        if p.seq is seq and p.group == group:
            dm = engine.managers[p.dst]
            if not dm.can_allocate(seq.seq_id, [group], seq.num_computed):
                return False
            dm.allocate(seq.seq_id, [group], seq.num_computed)
            inst.migrating.remove(p)
            _switch(engine, inst, seq, p.preemptions, group, p.src, p.dst, p.copied)
            return True
    return False


def advance(engine, index: int) -> None:
    """Pre-copies of instance ``index`` (call before anything else plans moves for its next
    step): each sends its next full blocks within the step's budget, or switches over with
    the rest when that fits. One whose destination left, or no longer has room, is dropped
    (the group stays where it is)."""
    inst = engine.instances[index]
    bs = engine.cfg.block_size
    keep = []
    for p in inst.migrating:
        seq, sid = p.seq, p.seq.seq_id
        if seq.status is not Status.RUNNING or seq.num_preemptions != p.preemptions:
            continue  # finished or recomputed: its blocks everywhere are freed
        dm = engine.managers[p.dst]
        n, left = seq.num_computed, budget_left(engine, inst)
        final = n - p.copied * bs <= left
        upto = n if final else min(n // bs, p.copied + left // bs) * bs
        if not engine.dispatcher.devices[p.dst].usable or not dm.can_allocate(sid, [p.group], upto):
            dm.free(sid, [p.group])
            continue
        dm.allocate(sid, [p.group], upto)
        if final:
            _switch(engine, inst, seq, p.preemptions, p.group, p.src, p.dst, p.copied)
            continue
        k = upto // bs
        if k > p.copied:
            src_t, dst_t = engine.managers[p.src].table(sid, p.group), dm.table(sid, p.group)
            inst.moves.append((seq, p.preemptions, KVMove(
                sid, p.group, p.src, p.dst, (k - p.copied) * bs, list(src_t[p.copied:k]),
                list(dst_t[p.copied:k]), partial=True), p))
        keep.append(p)
    inst.migrating = keep


def take(inst) -> tuple[list[KVMove], list[tuple]]:
    """The moves the instance's next step carries: those whose sequence is still as planned."""
    live = [c for c in inst.moves if c[0].status is Status.RUNNING and c[0].num_preemptions == c[1]]
    inst.moves.clear()
    return [c[2] for c in live], live


def settle(engine, inst, carried, ok: bool, lost: set[int] | None = None) -> None:
    """After the step that carried ``carried``: free the sources (ok), or recompute the
    sequences whose copy may not have happened (the step failed; with ``lost``, it ran to
    its end without those devices, and a move touching neither end was done). A failed
    pre-copy chunk is simply sent again."""
    for seq, n, m, pre in carried:
        if seq.status is not Status.RUNNING or seq.num_preemptions != n:
            continue  # finished or preempted meanwhile: its blocks are already freed
        if ok or (lost is not None and m.src not in lost and m.dst not in lost):
            engine.migrated_bytes += m.num_tokens * engine.kv_token_bytes
            if pre is not None:
                pre.copied += len(m.src_blocks)
                continue
            engine.managers[m.src].free(seq.seq_id, [m.group])
            engine.migrations += 1
        elif pre is None:
            inst.scheduler.preempt(seq)


def force_one(engine, index: int) -> bool:
    """Test knob (``EngineConfig.migrate_every``): move one group of one running sequence to
    the next live device its instance reaches, cycling, so every step path sees moves
    (pre-copied when larger than the step's budget)."""
    inst = engine.instances[index]
    n = len(engine.managers)
    for seq in list(inst.scheduler.running):
        for g in range(len(seq.placement or ())):
            for k in range(1, n):
                dst = (seq.placement[g] + k) % n
                if plan(engine, index, seq, g, dst, urgent=False):
                    return True
    return False
