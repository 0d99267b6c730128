"""Re-dispatch: where head groups go after admission (the paper's section 5.3).

Admission places a request's groups once (the dispatcher); what follows here
moves them while the request runs, with live migration (migration.py). Every
decision is made in ``Engine.begin_step`` for the instance about to step, and
only about that instance's own running sequences: between two of its steps
nothing of theirs is in flight, so a move's token count is exact and its
copy goes out first in the very next step.

- **KV balance instead of eviction** (:func:`relieve`, asked by the scheduler
  when a sequence cannot grow on a device): the victim is the latest-arrived
  request among those using that device (not yet scheduled in this step). If
  the cluster has room its groups there move to the devices that would finish
  their attention soonest (or, with this step's move budget spent, the
  sequence waits a step for them); only when none has room is the victim
  preempted (recomputed). A sequence that gave up room for itself runs at once; one
  that made another move waits one step, until the source blocks are free
  (they stay the victim's until its move has been carried).
- **Compute balance** (:func:`rebalance`): the predicted attention makespan
  (the slowest device's time) against the ideal f* of spreading all running
  work over the devices in proportion to their speed with only total memory
  as a limit (:func:`ideal_makespan`, a water-filling bisection). Above
  (1 + Theta) f*, the sequence with the most KV on the slowest device moves
  its groups there to where they lower the makespan most. A sequence moved in
  the last ``move_cooldown`` steps is not moved again (no ping-pong).
- **Drain** (:func:`drain`): a draining device (an attention worker told to
  stop) takes nothing new, and every group on it moves away as the step
  budget allows; with no room anywhere the sequence is recomputed instead.

Moves need an executor that copies KV (``supports_moves``); without one every
relief is a preemption and nothing is rebalanced or drained by moving.
"""
from __future__ import annotations

from hetis.engine import migration
from hetis.engine.block_manager import cdiv, groups_by_device
from hetis.engine.sequence import Sequence

RETRY, WAIT = "retry", "wait"


def _on(seq: Sequence, dev: int) -> list[int]:
    if not seq.placement:
        return []
    return list(groups_by_device(seq.placement).get(dev, ()))


def active(engine) -> bool:
    """Whether groups move for balance: the ``hetis`` policy with ``kv_balance`` on. A pinned
    placement, ``local-only`` and ``round-robin`` keep groups where they were put (a
    draining device is still emptied by moves)."""
    d = engine.dispatcher
    return engine.cfg.kv_balance and d.pinned is None and d.policy == "hetis"


def _dest(engine, inst, seq: Sequence, group: int, src: int, tokens, groups,
          reserved) -> int | None:
    """The device to move ``seq``'s ``group`` to from ``src``: usable, reached by the
    instance, with room for the group's reservation, the soonest done after taking it."""
    d = engine.dispatcher
    need = cdiv(d.expected_len(seq), d.block_size)
    best, best_t = None, None
    for i, dev in enumerate(d.devices):
        if i == src or not dev.usable or (inst.reach is not None and i not in inst.reach):
            continue
        if dev.capacity_blocks - reserved[i] < need or \
                not engine.managers[i].can_allocate(seq.seq_id, [group], seq.num_computed):
            continue
        t = dev.time(tokens[i] + seq.num_tokens, groups[i] + 1, d.row_bytes, d.L)
        if best_t is None or (t, i) < (best_t, best):
            best, best_t = i, t
    return best


def _move_off(engine, index: int, seq: Sequence, src: int, state=None, urgent: bool = True) -> int:
    """Plan moves of ``seq``'s groups on ``src`` elsewhere (pre-copied unless ``urgent``);
    the number planned."""
    inst = engine.instances[index]
    tokens, groups, reserved = state or engine.dispatcher.state()
    need = cdiv(engine.dispatcher.expected_len(seq), engine.dispatcher.block_size)
    moved = 0
    for g in _on(seq, src):
        if migration.moving(inst, seq, g):  # already on its way: now, if urgent
            moved += bool(urgent and migration.hurry(engine, inst, seq, g))
            continue
        dst = _dest(engine, inst, seq, g, src, tokens, groups, reserved)
        if dst is None or not migration.plan(engine, index, seq, g, dst, urgent):
            break
        tokens[dst] += seq.num_tokens
        groups[dst] += 1
        reserved[dst] += need
        tokens[src] -= seq.num_tokens
        groups[src] -= 1
        reserved[src] -= need
        moved += 1
    return moved


def relieve(engine, index: int, seq: Sequence, num_tokens: int, queue: list[Sequence]):
    """``seq`` cannot hold ``num_tokens``: make room (module doc). Returns RETRY (room is
    there now), WAIT (skip ``seq`` this step) or the sequence to preempt."""
    inst = engine.instances[index]
    sched = inst.scheduler
    short = next((b for b, m, gs, n in sched.needs(seq, num_tokens)
                  if not m.can_allocate(seq.seq_id, gs, n)), None)
    users = [s for s in queue if short in (s.placement or ())]
    victim = max(users + [seq], key=lambda s: (s.arrival, s.seq_id))
    if active(engine) and migration.can_move(inst):
        if _move_off(engine, index, victim, short):
            if victim is seq:
                return RETRY
            return WAIT if not sched._can_alloc(seq, num_tokens) else RETRY
        if migration.budget_left(engine, inst, urgent=True) < victim.num_computed and _dest(
                engine, inst, victim, _on(victim, short)[0], short, *engine.dispatcher.state()) is not None:
            return WAIT  # room elsewhere, but this step's moves are spent: next step
    return victim


def _fluid(engine, tokens, groups):
    """(work, [(rate, fixed, cap)] of the usable devices) of :func:`ideal_makespan`."""
    d = engine.dispatcher
    live = [i for i, dev in enumerate(d.devices) if dev.usable]
    work = sum(tokens[i] for i in range(len(tokens)))
    if not live or work <= 0:
        return work, []
    per = work / max(sum(groups), 1)  # tokens per group, on average
    out = []
    for i in live:
        dev = d.devices[i]
        extra = dev.cost_per_group + (d.row_bytes / dev.bandwidth if dev.remote else 0.0)
        out.append((d.L * (dev.cost_per_token + extra / per), d.L * dev.latency if dev.remote else 0.0,
                    engine.managers[i].capacity_tokens))
    return work, out


def ideal_makespan(engine, tokens, groups, fluid=None) -> float:
    """f*: the attention makespan if all running work (token x group reads) were spread
    over the usable devices in proportion to their speed, with only each device's total
    KV capacity as a limit (a fluid bound: per-group costs spread per token)."""
    work, devs = fluid or _fluid(engine, tokens, groups)
    if not devs:
        return 0.0

    def done(t: float) -> float:
        return sum([min(cap, max(0.0, (t - fixed) / rate)) for rate, fixed, cap in devs])
    if sum(cap for _, _, cap in devs) < work:  # more than every device can hold: all of them, full
        return max(fixed + rate * cap for rate, fixed, cap in devs)
    lo, hi = 0.0, max(fixed + rate * work for rate, fixed, _ in devs)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if done(mid) >= work else (mid, hi)
    return hi


def _within_ideal(engine, tokens, groups, t: float, factor: float) -> bool:
    """``t <= factor * ideal_makespan(...)``, without the bisection when a lower bound of
    f* already says so: with room for all the work, f* >= work / sum(1 / rate) (every
    device busy from 0, no fixed cost, no cap)."""
    fluid = _fluid(engine, tokens, groups)
    work, devs = fluid
    if devs and sum(cap for _, _, cap in devs) >= work:
        bound = work / sum(1 / rate for rate, _, _ in devs) * (1 - 1e-9)
        if t <= factor * bound:
            return True
    return t <= factor * ideal_makespan(engine, tokens, groups, fluid)


def rebalance(engine, index: int) -> bool:
    """Compute balance (module doc): True when a move was planned."""
    theta = engine.cfg.rebalance_threshold
    inst = engine.instances[index]
    if theta <= 0 or not active(engine) or not migration.can_move(inst):
        return False
    d = engine.dispatcher
    tokens, groups, reserved = d.state()
    times = d.predicted_times(tokens, groups)
    live = [i for i, dev in enumerate(d.devices) if dev.usable]
    if len(live) < 2:
        return False
    slow = max(live, key=lambda i: (times[i], -i))
    if _within_ideal(engine, tokens, groups, times[slow], 1 + theta):
        return False
    now = engine._next_step
    cands = [s for s in inst.scheduler.running if s.placement
             and slow in groups_by_device(s.placement) and now - s.moved_at >= engine.cfg.move_cooldown]
    if not cands:
        return False
    seq = max(cands, key=lambda s: (s.num_tokens * len(_on(s, slow)), -s.arrival))
    # only if it helps: the slowest device after the move must be faster than before
    k = len(_on(seq, slow))
    after = d.devices[slow].time(tokens[slow] - k * seq.num_tokens, groups[slow] - k, d.row_bytes, d.L)
    dst = _dest(engine, inst, seq, _on(seq, slow)[0], slow, tokens, groups, reserved)
    if dst is None:
        return False
    gain = d.devices[dst].time(tokens[dst] + k * seq.num_tokens, groups[dst] + k, d.row_bytes, d.L)
    if max(after, gain) >= times[slow]:
        return False
    return _move_off(engine, index, seq, slow, (tokens, groups, reserved), urgent=False) > 0


def drain(engine, index: int) -> int:
    """Move the instance's groups off draining devices (module doc); returns the moves
    planned. Sequences that cannot move anywhere are preempted."""
    d = engine.dispatcher
    draining = [i for i, dev in enumerate(d.devices) if dev.draining and not dev.lost]
    inst = engine.instances[index]
    planned = 0
    for dev in draining:
        for seq in list(inst.scheduler.running):
            todo = [g for g in _on(seq, dev) if not migration.moving(inst, seq, g)]
            if not todo:
                continue  # nothing there, or all of it already on its way
            if migration.can_move(inst) and seq.num_computed:
                n = _move_off(engine, index, seq, dev, urgent=False)
                planned += n
                state = d.state()
                if n or _dest(engine, inst, seq, todo[0], dev, *state) is not None:
                    continue  # on its way, or room elsewhere for the next steps
            inst.scheduler.preempt(seq)  # nowhere to go (or nothing to copy): recompute
    return planned
