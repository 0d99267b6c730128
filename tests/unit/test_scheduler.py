"""The scheduler and engine with fake sequences and a fake executor: no model, no processes."""
from __future__ import annotations

from hetis.engine.sampling import SamplingParams
from tests.helpers.fakes import EOS, FakeExecutor, fake_engine


def run(engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def chunk_sizes(executor, seq_id):
    return [len(c.token_ids) for s in executor.steps for c in s.chunks if c.seq_id == seq_id]


def test_chunked_prefill_within_the_token_budget():
    ex = FakeExecutor()
    eng = fake_engine(executor=ex, max_num_batched_tokens=16, pinned=[0, 0, 0])
    seq = eng.add_request("a", list(range(40)), SamplingParams(max_tokens=3, ignore_eos=True))
    run(eng)
    assert chunk_sizes(ex, seq.seq_id) == [16, 16, 8, 1, 1]
    samples = [c.sample for s in ex.steps for c in s.chunks]
    assert samples == [False, False, True, True, True]
    assert seq.output_token_ids == [41 % 50, 42 % 50, 43 % 50] and seq.finish_reason == "length"


def test_running_decodes_go_first_and_new_prompts_take_what_is_left():
    ex = FakeExecutor()
    eng = fake_engine(executor=ex, max_num_batched_tokens=16, pinned=[0, 0, 0])
    a = eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    eng.step()                                        # a's prefill
    b = eng.add_request("b", list(range(30)), SamplingParams(max_tokens=1, ignore_eos=True))
    eng.step()
    last = ex.steps[-1].chunks
    assert [(c.seq_id, len(c.token_ids)) for c in last] == [(a.seq_id, 1), (b.seq_id, 15)]
    assert sum(len(c.token_ids) for c in last) == 16


def test_max_num_seqs_caps_the_batch_and_everyone_finishes():
    ex = FakeExecutor()
    eng = fake_engine(executor=ex, max_num_seqs=2, pinned=[0, 0, 0])
    seqs = [eng.add_request(f"r{i}", [i + 1] * 5, SamplingParams(max_tokens=4, ignore_eos=True))
            for i in range(5)]
    run(eng)
    assert max(len(s.chunks) for s in ex.steps) == 2
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 4 for s in seqs)


def test_short_kv_preempts_the_latest_admitted_by_recompute():
    def alone(prompt):
        e = fake_engine(blocks=64, pinned=[0, 0, 0])
        s = e.add_request("x", prompt, SamplingParams(max_tokens=20, ignore_eos=True))
        run(e)
        return s.output_token_ids

    prompts = [list(range(1, 9)), list(range(2, 14))]
    # 3 groups x (8 + 20) tokens in blocks of 4 = 21 blocks each: both cannot grow in 30 blocks
    eng = fake_engine(blocks=30, pinned=[0, 0, 0])
    seqs = [eng.add_request(f"r{i}", p, SamplingParams(max_tokens=20, ignore_eos=True))
            for i, p in enumerate(prompts)]
    run(eng)
    assert eng.scheduler.num_preemptions >= 1
    assert seqs[1].num_preemptions >= 1 and seqs[0].num_preemptions == 0  # the later one yields
    assert [s.output_token_ids for s in seqs] == [alone(p) for p in prompts]
    assert eng.managers[0].used_tokens == 0  # everything freed at the end


def test_a_request_that_can_never_fit_is_finished_not_stuck():
    eng = fake_engine(blocks=8, pinned=[0, 0, 0])  # 8 blocks of 4 tokens: < 3 groups x 16 tokens
    seq = eng.add_request("big", list(range(16)), SamplingParams(max_tokens=4))
    outs = eng.step()
    assert seq.finished and seq.finish_reason == "length" and not seq.output_token_ids
    assert [o.seq for o in outs] == [seq] and outs[0].finished
    assert not eng.has_unfinished()


def test_step_work_follows_the_placement_and_reports_freed_sequences():
    ex = FakeExecutor()
    eng = fake_engine(devices=3, executor=ex, pinned=[2, 0, 1])
    seq = eng.add_request("a", list(range(1, 7)), SamplingParams(max_tokens=2, ignore_eos=True))
    eng.step()
    work = ex.steps[0].work
    assert [[(it.seq_id, it.group) for it in w] for w in work] == \
        [[(seq.seq_id, 1)], [(seq.seq_id, 2)], [(seq.seq_id, 0)]]
    for b, w in enumerate(work):
        it = w[0]
        assert (it.start, it.num_new) == (0, 6)
        assert it.blocks == eng.managers[b].table(seq.seq_id, it.group) and len(it.blocks) == 2
    run(eng)
    n = len(ex.steps)
    eng.step()  # nothing left to run: a step of no chunks carries the freed id
    assert len(ex.steps) == n + 1
    assert ex.steps[-1].chunks == [] and ex.steps[-1].freed == [seq.seq_id]
    eng.step()  # and then nothing at all
    assert len(ex.steps) == n + 1


def test_the_dispatcher_places_admitted_requests():
    eng = fake_engine(devices=3, policy="round-robin")
    seqs = [eng.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=2)) for i in range(2)]
    eng.step()
    assert [s.placement for s in seqs] == [[0, 1, 2], [0, 1, 2]]
    snap = eng.snapshot()
    assert snap.policy == "round-robin" and snap.running == 2
    assert all(set(d.resident) == {"r0", "r1"} for d in snap.devices)


def test_eos_and_stop_strings():
    # the default fake samples token (p + 1) % 50 at position p; token i spells letter i
    eng = fake_engine(pinned=[0, 0, 0])
    stop = eng.add_request("s", [0, 1, 2], SamplingParams(max_tokens=20, stop=["fg"]))
    eos = fake_engine(pinned=[0, 0, 0], executor=FakeExecutor(lambda sid, pos: EOS if pos >= 6 else pos))
    e = eos.add_request("e", [0, 1, 2], SamplingParams(max_tokens=20))
    run(eng)
    run(eos)
    assert stop.finish_reason == "stop" and stop.text == "e"  # "efg" cut at the stop string
    assert e.finish_reason == "stop" and e.output_token_ids[-1] == EOS and e.text == "def"
