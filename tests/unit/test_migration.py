"""Head-group migration's accounting (hetis/engine/migration.py), without a model."""
from __future__ import annotations

from hetis.engine import migration
from hetis.engine.sampling import SamplingParams
from tests.helpers.fakes import FakeExecutor, fake_engine

LONG = SamplingParams(max_tokens=50, ignore_eos=True)


def running_engine():
    ex = FakeExecutor()
    eng = fake_engine(devices=3, executor=ex, pinned=[0, 0, 1])
    seq = eng.add_request("a", [1, 2, 3, 4, 5, 6], LONG)
    eng.step()
    return eng, ex, seq


def test_a_move_switches_accounting_at_once_and_frees_the_source_after_its_step():
    eng, ex, seq = running_engine()
    src_table = list(eng.managers[0].table(seq.seq_id, 1))
    assert migration.plan(eng, 0, seq, 1, 2)
    assert seq.placement == [0, 2, 1]
    assert eng.managers[2].table(seq.seq_id, 1)  # the destination holds it from now on
    assert eng.managers[0].table(seq.seq_id, 1) == src_table  # the source until the step ends
    eng.step()
    (m,) = ex.steps[-1].moves
    assert (m.seq_id, m.group, m.src, m.dst, m.num_tokens) == (seq.seq_id, 1, 0, 2, 6)
    assert m.src_blocks == src_table
    assert [it.group for it in ex.steps[-1].work[2]] == [1]  # the step already attends there
    assert (seq.seq_id, 1) not in eng.managers[0].tables and set(src_table) <= set(eng.managers[0].free_blocks)
    assert eng.migrations == 1 and eng.migrated_bytes == 6 * eng.kv_token_bytes > 0
    eng.step()
    assert not ex.steps[-1].moves  # a move goes out once


def test_moves_that_cannot_be_made_are_refused():
    eng, _, seq = running_engine()
    assert not migration.plan(eng, 0, seq, 1, 0)   # already there
    assert not migration.plan(eng, 0, seq, 1, 7)   # no such device
    eng.dispatcher.devices[2].lost = True
    assert not migration.plan(eng, 0, seq, 1, 2)   # lost
    eng.dispatcher.devices[2].lost = False
    eng.managers[2].free_blocks.clear()
    assert not migration.plan(eng, 0, seq, 1, 2)   # no room
    assert seq.placement == [0, 0, 1]


def test_a_sequence_preempted_before_its_move_drops_it_and_a_failed_step_recomputes():
    eng, ex, seq = running_engine()
    assert migration.plan(eng, 0, seq, 0, 1)
    eng.scheduler.preempt(seq)
    eng.step()
    assert not ex.steps[-1].moves and eng.migrations == 0  # recomputed where it is placed now
    assert seq.placement == [0, 0, 1] and (seq.seq_id, 0) in eng.managers[0].tables
    # a failed step: whether the copy happened is unknown, so the sequence is recomputed
    eng2, _, seq2 = running_engine()
    assert migration.plan(eng2, 0, seq2, 0, 2)
    planned, _ = eng2.begin_step(0)
    assert planned.step.moves
    eng2.end_step(planned, None)
    assert seq2.num_preemptions == 1 and seq2.num_computed == 0 and seq2.placement is None
    assert eng2.migrations == 0


def test_a_large_move_is_pre_copied_within_the_step_budget_then_switched():
    ex = FakeExecutor()
    eng = fake_engine(devices=3, executor=ex, pinned=[0, 0, 1], max_move_tokens=8)  # 2 blocks
    seq = eng.add_request("a", list(range(1, 31)), LONG)  # 30 tokens: 8 blocks of 4
    eng.step()
    assert migration.plan(eng, 0, seq, 1, 2, urgent=False)
    assert seq.placement == [0, 0, 1]  # still attending at the source
    chunks = []
    while seq.placement[1] != 2:
        src_table = list(eng.managers[0].table(seq.seq_id, 1))
        eng.step()  # plans, carries and settles this step's chunk (or the switch)
        moves = ex.steps[-1].moves
        assert sum(m.num_tokens for m in moves) <= 8  # never more than the budget
        assert all(it.group != 1 for it in ex.steps[-1].work[2]) or not moves[-1].partial
        chunks += moves
    *pre, last = chunks
    assert len(pre) >= 3 and all(m.partial for m in pre) and not last.partial
    # every source block copied once, in order: full blocks ahead, the rest with the switch
    assert [b for m in chunks for b in m.src_blocks] == src_table
    assert all(m.num_tokens == 4 * len(m.src_blocks) for m in pre)
    assert eng.migrations == 1 and (seq.seq_id, 1) not in eng.managers[0].tables
    assert eng.migrated_bytes == sum(m.num_tokens for m in chunks) * eng.kv_token_bytes


def test_an_urgent_move_of_a_group_being_pre_copied_goes_at_once():
    ex = FakeExecutor()
    eng = fake_engine(devices=3, executor=ex, pinned=[0, 0, 1], max_move_tokens=8)
    seq = eng.add_request("a", list(range(1, 31)), LONG)
    eng.step()
    assert migration.plan(eng, 0, seq, 1, 2, urgent=False)
    eng.step()  # one chunk went
    assert ex.steps[-1].moves[0].partial and eng.migrations == 0
    assert migration.hurry(eng, eng.instances[0], seq, 1) and seq.placement[1] == 2
    eng.step()  # the whole rest, over the budget: it is urgent
    last = ex.steps[-1].moves[-1]
    assert not last.partial and last.num_tokens > 8 and eng.migrations == 1
