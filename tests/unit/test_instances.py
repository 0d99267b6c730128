"""Several serving instances (dense workers) sharing one attention device, without a model:
dealing requests out, one KV accounting, losing an instance, fenced frees, concurrent steps."""
from __future__ import annotations

import threading

from hetis.engine.dispatcher import Device
from hetis.engine.sampling import SamplingParams
from hetis.engine.serving import ServingLoop
from hetis.engine.step import InstanceLost
from tests.helpers.fakes import FakeExecutor, fake_engine

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def two_instances(blocks: int = 1000, policy: str = "round-robin", ex_a=None, ex_b=None, **cfg):
    """Instance a: device 0 (its own) and 1 (the shared attention device); instance b:
    device 2 (its own) and 1."""
    ex_a, ex_b = ex_a or FakeExecutor(), ex_b or FakeExecutor()
    eng = fake_engine(devices=2, blocks=blocks, policy=policy, executor=ex_a, **cfg)
    eng.instances[0].reach = {0, 1}
    local = eng.add_device(Device("d2", blocks))
    eng.add_instance("b", ex_b, local, {1, 2})
    return eng, ex_a, ex_b


def collect(q) -> list[int]:
    """Every token of a request's outputs (an exception fails the test)."""
    toks = []
    while True:
        o = q.get(timeout=30)
        assert not isinstance(o, Exception), o
        toks += o.new_token_ids
        if o.finished:
            return toks


def reference(prompts, params=GREEDY):
    eng = fake_engine(devices=1)
    seqs = [eng.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    eng.run_to_completion()
    return [s.output_token_ids for s in seqs]


PROMPTS = [[1 + i, 2, 3 + i % 5][: 1 + i % 3] for i in range(8)]


def test_requests_are_dealt_out_and_each_instance_places_only_where_it_reaches():
    eng, ex_a, ex_b = two_instances()
    seqs = [eng.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    assert sorted(eng.owner[s.seq_id] for s in seqs) == [0] * 4 + [1] * 4  # a burst is split evenly
    eng.run_to_completion()
    assert [s.output_token_ids for s in seqs] == reference(PROMPTS)
    assert ex_a.steps and ex_b.steps
    for ex, other_local in ((ex_a, 2), (ex_b, 0)):
        for step in ex.steps:
            assert not step.work[other_local]  # never another instance's own device
    # both used the shared device, under one accounting that ends empty
    assert any(step.work[1] for step in ex_a.steps) and any(step.work[1] for step in ex_b.steps)
    assert all(m.used_tokens == 0 for m in eng.managers)


def test_the_shared_device_is_never_over_committed():
    # the shared device holds 6 blocks of 4 tokens (a request's group needs 4); the rest
    # is plentiful; the dispatcher spreads groups by predicted time, so both fill it
    eng, ex_a, ex_b = two_instances(blocks=1000, policy="hetis")
    eng.managers[1].__init__(6, 4)
    eng.dispatcher.devices[1].capacity_blocks = 6
    peak = []
    for ex in (ex_a, ex_b):
        run = ex.execute

        def watch(step, run=run):
            peak.append(eng.managers[1].used_tokens)
            return run(step)
        ex.execute = watch
    seqs = [eng.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    eng.run_to_completion()
    assert [s.output_token_ids for s in seqs] == reference(PROMPTS)
    assert max(peak) <= 6 * 4 and max(peak) > 0


def test_a_lost_instance_hands_its_sequences_to_the_other_with_nothing_repeated():
    eng, ex_a, ex_b = two_instances()
    seqs = [eng.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    for _ in range(4):
        eng.step()
    on_b = [s for s in seqs if eng.owner[s.seq_id] == 1]
    before = {s.seq_id: list(s.output_token_ids) for s in on_b}
    assert all(before.values())
    moved = eng.lose_instance(1)
    assert {s.seq_id for s in moved} == {s.seq_id for s in on_b} and all(eng.owner[s.seq_id] == 0 for s in on_b)
    assert eng.dispatcher.devices[2].lost and eng.managers[2].used_tokens == 0
    n_b = len(ex_b.steps)
    eng.run_to_completion()
    assert len(ex_b.steps) == n_b  # the lost instance is never stepped again
    assert [s.output_token_ids for s in seqs] == reference(PROMPTS)
    for s in on_b:  # kept their tokens so far, recomputed them on a
        assert s.output_token_ids[:len(before[s.seq_id])] == before[s.seq_id] and s.num_preemptions == 1


def test_an_instance_that_replaces_a_lost_one_adopts_its_waiting_sequences():
    eng, _, _ = two_instances()
    s = eng.add_request("x", [1, 2, 3], GREEDY)
    assert eng.owner[s.seq_id] == 0
    eng.step()
    eng.lose_instance(1)
    eng.lose_instance(0)  # none is left: the sequence waits on the lost instance
    assert eng.has_unfinished() and s in eng.instances[0].scheduler.waiting
    assert eng.step() == []
    ex_c = FakeExecutor()
    local = eng.add_device(Device("d0-again", 1000), index=0)
    assert eng.add_instance("c", ex_c, local, {0, 1}, index=0) == 0
    eng.run_to_completion()
    assert s.output_token_ids == reference([[1, 2, 3]])[0] and ex_c.steps


def test_blocks_freed_during_a_step_in_flight_wait_for_it():
    eng, _, _ = two_instances(policy="local-only")
    a = eng.add_request("a", [1, 2, 3, 4], GREEDY)
    planned, _ = eng.begin_step(eng.owner[a.seq_id])
    held = list(eng.managers[0].table(a.seq_id, 0))
    eng.abort("a")  # while its step is in flight: its blocks may still be written
    assert eng.managers[0].deferred and not set(held) & set(eng.managers[0].free_blocks)
    assert eng.end_step(planned, [9]) == []  # the aborted sequence's token is dropped
    assert not eng.managers[0].deferred and set(held) <= set(eng.managers[0].free_blocks)


def test_the_serving_loop_steps_instances_concurrently():
    """Instance a's first step blocks until instance b has run five steps: in lockstep, never."""
    b_steps = threading.Semaphore(0)

    class Slow(FakeExecutor):
        def execute(self, step):
            if step.chunks and not self.steps:
                for _ in range(5):
                    assert b_steps.acquire(timeout=10), "instance b did not step meanwhile"
            return super().execute(step)

    class Fast(FakeExecutor):
        def execute(self, step):
            out = super().execute(step)
            b_steps.release()
            return out

    eng, _, _ = two_instances(ex_a=Slow(), ex_b=Fast())
    loop = ServingLoop(eng, max_queue=16).start()
    try:
        outs = {rid: loop.submit(rid, [1, 2, 3], GREEDY, None) for rid in ("a", "b")}
        for rid, q in outs.items():
            last = None
            while last is None or not (isinstance(last, Exception) or last.finished):
                last = q.get(timeout=30)
            assert not isinstance(last, Exception) and last.completion_tokens == 12, last
    finally:
        loop.stop()


def test_the_serving_loop_recovers_a_lost_instance_on_the_other():
    gone = {"on": False}

    class Dies(FakeExecutor):
        def execute(self, step):
            if gone["on"]:
                raise InstanceLost("dense worker b step failed: UNAVAILABLE: gone")
            out = super().execute(step)
            if len(self.steps) == 3:
                gone["on"] = True
            return out

    eng, ex_a, _ = two_instances(ex_b=Dies())
    loop = ServingLoop(eng, max_queue=16).start()
    try:
        qs = [loop.submit(f"r{i}", p, GREEDY, None) for i, p in enumerate(PROMPTS)]
        assert [collect(q) for q in qs] == reference(PROMPTS)
        snap = loop.call(lambda e: e.snapshot())
        assert [i.lost for i in snap.instances] == [False, True]
    finally:
        loop.stop()


def test_a_late_failure_of_a_replaced_instance_does_not_drop_its_replacement():
    release, started = threading.Event(), threading.Event()

    class Hangs(FakeExecutor):
        def execute(self, step):
            started.set()
            assert release.wait(10)
            raise InstanceLost("dense worker b step failed: DEADLINE_EXCEEDED")

    class Waits(FakeExecutor):  # "a" still runs on instance a when "b" arrives
        def execute(self, step):
            assert started.wait(10)
            return super().execute(step)

    eng, _, _ = two_instances(ex_a=Waits(), ex_b=Hangs())
    loop = ServingLoop(eng, max_queue=16).start()
    try:
        loop.submit("a", [1, 2, 3], GREEDY, None)
        q = loop.submit("b", [1, 2, 3], GREEDY, None)  # dealt to instance b, whose step hangs
        assert started.wait(10)

        def replace_b(e):  # the router found b gone (Info) and a restarted b joined
            e.lose_instance(1)
            local = e.add_device(Device("d2-again", 1000), index=2)
            return e.add_instance("b2", FakeExecutor(), local, {1, local}, index=1)
        assert loop.call(replace_b) == 1
        release.set()  # the old step fails now: old news
        assert collect(q) == reference([[1, 2, 3]])[0]
        snap = loop.call(lambda e: e.snapshot())
        assert [(i.name, i.lost) for i in snap.instances] == [("0", False), ("b2", False)]
    finally:
        loop.stop()


def test_blocks_held_by_a_step_in_flight_keep_waiting_requests_waiting():
    """A sequence moved off a lost instance while that instance's step was in flight must
    wait for the fenced blocks, not be refused as never fitting (nothing runs meanwhile)."""
    eng, _, _ = two_instances()
    a = eng.add_request("a", [1, 2, 3, 4], GREEDY)
    planned, _ = eng.begin_step(eng.owner[a.seq_id])
    eng.lose_instance(0)  # a's blocks are fenced: the step may still write them
    assert not any(i.scheduler.running for i in eng.instances)
    assert eng._busy()  # a step in flight, blocks on a fence: room will come
    eng.end_step(planned, None)
    assert not eng._busy()
    eng.run_to_completion()
    assert a.output_token_ids == reference([[1, 2, 3, 4]])[0]
