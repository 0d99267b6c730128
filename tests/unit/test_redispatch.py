"""Re-dispatch policy (hetis/engine/redispatch.py) without a model: admission with headroom,
KV balance instead of eviction, the victim, compute balance, no ping-pong, drain."""
from __future__ import annotations

from hetis.engine import redispatch
from hetis.engine.dispatcher import Device
from hetis.engine.sampling import SamplingParams
from tests.helpers.fakes import FakeExecutor, fake_engine

LONG = SamplingParams(max_tokens=40, ignore_eos=True)


def two_devices(small: int, big: int, slow_big: bool = True, executor=None, **cfg):
    """Device 0 (the dense side's, ``small`` blocks of 4 tokens) and a remote device 1
    (``big`` blocks; slower per token, so admission fills device 0 first)."""
    eng = fake_engine(devices=1, blocks=small, executor=executor or FakeExecutor(), **cfg)
    eng.add_device(Device("d1", big, cost_per_token=1e-7 if slow_big else 1e-8, remote=True))
    return eng


def run(eng, seqs) -> None:
    eng.run_to_completion()
    assert all(len(s.output_token_ids) == s.params.max_tokens for s in seqs)


def moved(ex) -> list[tuple[int, int, int, int]]:
    return [(m.seq_id, m.group, m.src, m.dst) for st in ex.steps for m in st.moves]


def test_headroom_reserves_what_a_request_holds_now_plus_headroom():
    full = two_devices(small=8, big=8)
    s = full.add_request("a", list(range(1, 9)), SamplingParams(max_tokens=100, ignore_eos=True))
    full.step()
    assert s.placement is None and s.finish_reason == "length"  # 108 tokens never fit anywhere
    eng = two_devices(small=8, big=8, kv_headroom=4)
    s = eng.add_request("a", list(range(1, 9)), SamplingParams(max_tokens=100, ignore_eos=True))
    eng.step()
    assert s.placement is not None and eng.dispatcher.expected_len(s) == s.num_tokens + 4


def test_a_full_device_moves_the_latest_arrival_away_instead_of_preempting():
    ex = FakeExecutor()
    eng = two_devices(small=40, big=400, executor=ex, kv_headroom=0, rebalance_threshold=0)
    seqs = [eng.add_request(f"r{i}", [1 + i, 2, 3, 4], LONG) for i in range(4)]
    run(eng, seqs)
    assert eng.num_preemptions == 0 and eng.migrations > 0
    assert {src for _, _, src, _ in moved(ex)} == {0}  # only off the device that ran short
    # victims go latest-arrived first: the first request never moved
    assert seqs[0].seq_id not in {sid for sid, *_ in moved(ex)}
    assert all(m.used_tokens == 0 for m in eng.managers)


def test_the_victim_is_the_latest_arrival_among_the_users_of_the_short_device():
    eng = two_devices(small=40, big=400, kv_headroom=0, kv_balance=False, rebalance_threshold=0)
    seqs = [eng.add_request(f"r{i}", [1 + i, 2, 3, 4], LONG) for i in range(3)]
    eng.step()
    for s in seqs:  # pin them: r0 and r2 on device 0 only, r1 on device 1 only
        s.placement = [0, 0, 0] if s is not seqs[1] else [1, 1, 1]
    sched = eng.scheduler
    victim = sched.relieve(seqs[0], 1000, [seqs[1], seqs[2]])
    assert victim is seqs[2]  # r1 arrived later than r0 but holds nothing on device 0
    assert sched.relieve(seqs[2], 1000, [seqs[1]]) is seqs[2]  # itself, at the latest


def test_with_the_whole_cluster_full_the_victim_is_preempted():
    eng = two_devices(small=30, big=30, kv_headroom=0, rebalance_threshold=0)
    seqs = [eng.add_request(f"r{i}", [1 + i, 2, 3, 4], LONG) for i in range(6)]
    run(eng, seqs)
    assert eng.num_preemptions > 0


def test_an_executor_that_cannot_move_kv_gets_preemptions_not_moves():
    class NoMoves(FakeExecutor):
        supports_moves = False
    ex = NoMoves()
    eng = two_devices(small=40, big=400, executor=ex, kv_headroom=0)
    seqs = [eng.add_request(f"r{i}", [1 + i, 2, 3, 4], LONG) for i in range(4)]
    run(eng, seqs)
    assert eng.migrations == 0 and not moved(ex) and eng.num_preemptions > 0


def imbalanced(theta: float, cooldown: int = 16):
    """Every request's groups on device 0 of two equal devices (admitted local-only)."""
    ex = FakeExecutor()
    eng = two_devices(small=400, big=400, slow_big=False, executor=ex,
                      rebalance_threshold=theta, move_cooldown=cooldown)
    eng.dispatcher.policy = "local-only"
    seqs = [eng.add_request(f"r{i}", [1 + i, 2, 3, 4] * 4, LONG) for i in range(4)]
    eng.step()
    eng.dispatcher.policy = "hetis"
    return eng, ex, seqs


def test_compute_balance_moves_off_the_slowest_device_only_above_the_threshold():
    eng, ex, seqs = imbalanced(0.5)
    tokens, groups, _ = eng.dispatcher.state()
    times = eng.dispatcher.predicted_times(tokens, groups)
    ideal = redispatch.ideal_makespan(eng, tokens, groups)
    assert times[1] == 0 and abs(ideal - times[0] / 2) < 0.05 * times[0]  # equal devices: half
    assert redispatch.rebalance(eng, 0)
    eng.step()
    (m, *_) = ex.steps[-1].moves
    biggest = max(seqs, key=lambda s: (s.num_tokens, -s.arrival))
    assert (m.seq_id, m.src, m.dst) == (biggest.seq_id, 0, 1)
    for theta in (0.0, 3.0):  # off, and a threshold the imbalance is under (2x the ideal)
        eng, ex, _ = imbalanced(theta)
        assert not redispatch.rebalance(eng, 0)


def test_a_moved_request_is_not_moved_again_at_once():
    eng, ex, seqs = imbalanced(0.01, cooldown=10)
    run(eng, seqs)
    last: dict[int, int] = {}
    for i, st in enumerate(ex.steps):
        for sid in {m.seq_id for m in st.moves}:  # several groups of one request: one move
            assert i - last.get(sid, -100) >= 10, "moved again within the cooldown"
            last[sid] = i
    assert eng.migrations > 0


def test_a_draining_device_is_emptied_by_moves_and_takes_nothing_new():
    ex = FakeExecutor()
    eng = two_devices(small=400, big=400, slow_big=False, executor=ex, rebalance_threshold=0)
    seqs = [eng.add_request(f"r{i}", [1 + i, 2, 3, 4], LONG) for i in range(4)]
    eng.step()
    assert any(1 in s.placement for s in seqs)
    assert eng.drain_device(1) == []
    eng.step()
    assert all(1 not in s.placement for s in seqs) and not eng.managers[1].tables
    late = eng.add_request("late", [9, 9], LONG)
    run(eng, seqs + [late])
    assert eng.num_preemptions == 0 and eng.migrations > 0
    assert not any(it for st in ex.steps[2:] for it in st.work[1])  # nothing ran there since


def test_draining_with_no_room_elsewhere_recomputes_and_without_moves_loses_the_device():
    eng = two_devices(small=40, big=400, slow_big=False, rebalance_threshold=0)
    seqs = [eng.add_request(f"r{i}", [1 + i, 2, 3, 4], LONG) for i in range(4)]
    eng.step()
    eng.drain_device(1)
    run(eng, seqs)
    assert eng.num_preemptions > 0

    class NoMoves(FakeExecutor):
        supports_moves = False
    eng = two_devices(small=400, big=400, slow_big=False, executor=NoMoves())
    seqs = [eng.add_request(f"r{i}", [1 + i, 2, 3, 4], LONG) for i in range(4)]
    eng.step()
    users = [s for s in seqs if 1 in s.placement]
    assert users and eng.drain_device(1) == users[::-1] and eng.dispatcher.devices[1].lost
