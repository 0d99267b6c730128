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
carries at most ``EngineConfig.max_move_tokens`` of KV (tokens x groups; one
group always fits), so the copy a step waits for is bounded. The executor in
``hetis.LLM`` copies between its in-process backends; over the mesh the dense
worker pulls the KV from the source's tensor channel and pushes it down the
destination's (hetis/mesh/tensor_path.py) before the step's layouts go out.
An executor that cannot copy (``supports_moves`` false) gets no moves: the
policy falls back to preemption.
"""
from __future__ import annotations

from hetis.engine.sequence import Sequence, Status
from hetis.engine.step import KVMove


def can_move(inst) -> bool:
    return bool(getattr(inst.executor, "supports_moves", False))


def budget_left(engine, inst) -> int:
    """KV tokens (x groups) the instance's next step may still carry (module doc)."""
    return engine.cfg.max_move_tokens - sum(m.num_tokens for _, _, m in inst.moves)


def plan(engine, index: int, seq: Sequence, group: int, dst: int) -> bool:
    """Move ``seq``'s ``group`` to device ``dst`` with the next step of instance ``index``;
    False when it cannot (not running, nothing cached, same device, no room, not reachable,
    draining, over the step's move budget, or an executor that cannot copy)."""
    inst = engine.instances[index]
    src = seq.placement[group] if seq.placement else None
    dev = engine.dispatcher.devices[dst] if 0 <= dst < len(engine.managers) else None
    n = seq.num_computed
    if (seq.status is not Status.RUNNING or not n or src is None or src == dst
            or dev is None or not dev.usable or (inst.reach is not None and dst not in inst.reach)
            or not can_move(inst) or (inst.moves and budget_left(engine, inst) < n)
            or any(m.seq_id == seq.seq_id and m.group == group for _, _, m in inst.moves)):
        return False
    dm = engine.managers[dst]
    if not dm.can_allocate(seq.seq_id, [group], n):
        return False
    dm.allocate(seq.seq_id, [group], n)
    move = KVMove(seq.seq_id, group, src, dst, n, list(engine.managers[src].table(seq.seq_id, group)),
                  list(dm.table(seq.seq_id, group)))
    seq.placement[group] = dst
    seq.moved_at = engine._next_step
    inst.moves.append((seq, seq.num_preemptions, move))
    return True


def take(inst) -> tuple[list[KVMove], list[tuple[Sequence, int, KVMove]]]:
    """The moves the instance's next step carries: those whose sequence is still as planned."""
    live = [(s, n, m) for s, n, m in inst.moves
            if s.status is Status.RUNNING and s.num_preemptions == n]
    inst.moves.clear()
    return [m for _, _, m in live], live


def settle(engine, inst, carried, ok: bool, lost: set[int] | None = None) -> None:
    """After the step that carried ``carried``: free the sources (ok), or recompute the
    sequences whose copy may not have happened (the step failed; with ``lost``, it ran to
    its end without those devices, and a move touching neither end was done)."""
    for seq, n, m in carried:
        if seq.status is not Status.RUNNING or seq.num_preemptions != n:
            continue  # finished or preempted meanwhile: its blocks are already freed
        if ok or (lost is not None and m.src not in lost and m.dst not in lost):
            engine.managers[m.src].free(seq.seq_id, [m.group])
            engine.migrations += 1
            engine.migrated_bytes += m.num_tokens * engine.kv_token_bytes
        else:
            inst.scheduler.preempt(seq)


def force_one(engine, index: int) -> bool:
    """Test knob (``EngineConfig.migrate_every``): move one group of one running sequence to
    the next live device its instance reaches, cycling, so every step path sees moves."""
    inst = engine.instances[index]
    n = len(engine.managers)
    for seq in list(inst.scheduler.running):
        for g in range(len(seq.placement or ())):
            for k in range(1, n):
                dst = (seq.placement[g] + k) % n
                if plan(engine, index, seq, g, dst):
                    return True
    return False
