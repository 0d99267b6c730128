"""The simulator's hot paths in the engine (block accounting by sequence, placements split
per device, f*'s bound) give what the plain per-group forms give: same blocks, same order,
same decisions (the engine's exactness depends on it)."""
from __future__ import annotations

import random

from hetis.engine import redispatch
from hetis.engine.block_manager import BlockManager, cdiv, groups_by_device
from hetis.engine.dispatcher import Device
from hetis.engine.sampling import SamplingParams
from tests.helpers.fakes import FakeExecutor, fake_engine


class PerGroup:
    """Block accounting one (sequence, group) at a time: the reference."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size, self.free_blocks, self.tables = block_size, list(range(num_blocks - 1, -1, -1)), {}

    def blocks_needed(self, sid, groups, n):
        want = cdiv(n, self.block_size)
        return sum(max(0, want - len(self.tables.get((sid, g), ()))) for g in groups)

    def allocate(self, sid, groups, n):
        want = cdiv(n, self.block_size)
        for g in groups:
            table = self.tables.setdefault((sid, g), [])
            while len(table) < want:
                table.append(self.free_blocks.pop())

    def free(self, sid, groups=None):
        for k in [k for k in self.tables if k[0] == sid and (groups is None or k[1] in groups)]:
            self.free_blocks.extend(reversed(self.tables.pop(k)))


def test_block_accounting_matches_the_per_group_reference_over_random_operations():
    rng = random.Random(0)
    fast, ref = BlockManager(400, 4), PerGroup(400, 4)
    for _ in range(3000):
        sid, n = rng.randrange(12), rng.randrange(0, 40)
        groups = sorted(rng.sample(range(8), rng.randrange(0, 9)))
        op = rng.random()
        assert fast.blocks_needed(sid, groups, n) == ref.blocks_needed(sid, groups, n)
        if op < 0.6:
            if ref.blocks_needed(sid, groups, n) <= len(ref.free_blocks):
                fast.allocate(sid, groups, n)
                ref.allocate(sid, groups, n)
        elif op < 0.8:
            fast.free(sid, groups)
            ref.free(sid, groups)
        else:
            fast.free(sid)
            ref.free(sid)
        assert fast.free_blocks == ref.free_blocks
        assert list(fast.tables.items()) == list(ref.tables.items())  # same tables, same order


def test_a_placement_split_per_device_keeps_group_and_device_order():
    placement = [2, 0, 2, 1, 0, 2]
    split = groups_by_device(placement)
    assert list(split.items()) == [(0, (1, 4)), (1, (3,)), (2, (0, 2, 5))]
    placement[1] = 1  # placements change in place (a move): the split follows the value
    assert groups_by_device(placement) == {0: (4,), 1: (1, 3), 2: (0, 2, 5)}


def test_the_bound_on_the_ideal_makespan_never_changes_the_rebalance_decision():
    eng = fake_engine(devices=1, blocks=400, executor=FakeExecutor())
    eng.add_device(Device("d1", 400, cost_per_token=3e-8, remote=True, latency=1e-5))
    eng.add_device(Device("d2", 100, cost_per_token=1e-7, remote=True))
    rng = random.Random(1)
    checked = 0
    for _ in range(300):
        tokens = [rng.randrange(0, 3000) for _ in range(3)]
        groups = [rng.randrange(1, 60) for _ in range(3)]
        ideal = redispatch.ideal_makespan(eng, tokens, groups)
        for f in (0.5, 0.99, 1.0, 1.01, 1.5, 3.0):
            t = f * ideal
            assert redispatch._within_ideal(eng, tokens, groups, t, 1.5) == (t <= 1.5 * ideal)
            checked += 1
    assert checked == 1800
    # and the engine still rebalances through it: all on one of two equal devices is 2x f*
    eng = fake_engine(devices=1, blocks=400, executor=FakeExecutor())
    eng.add_device(Device("d1", 400, remote=True))
    eng.dispatcher.policy = "local-only"
    for i in range(4):
        eng.add_request(f"r{i}", [1 + i, 2, 3, 4] * 4, SamplingParams(max_tokens=40, ignore_eos=True))
    eng.step()
    eng.dispatcher.policy = "hetis"
    assert redispatch.rebalance(eng, 0)
