"""The head dispatcher: cost- and memory-aware placement, never over-committing KV."""
from __future__ import annotations

import random

import pytest

from hetis.engine.dispatcher import Device, Dispatcher
from hetis.engine.sampling import SamplingParams
from hetis.engine.sequence import Sequence


def seq(prompt_len=100, max_tokens=28):
    return Sequence("r", list(range(prompt_len)), SamplingParams(max_tokens=max_tokens))


def fill(dispatcher: Dispatcher, n: int, **kw) -> list[Sequence]:
    """Admit n requests the way the scheduler does: place, then run."""
    running = []
    dispatcher.get_running = lambda: running
    for _ in range(n):
        s = seq(**kw)
        s.placement = dispatcher.place(s)
        if s.placement is None:
            break
        running.append(s)
    return running


def counts(running, n_dev):
    c = [0] * n_dev
    for s in running:
        for d in s.placement:
            c[d] += 1
    return c


def make(devs, policy="hetis", groups=8, layers=4, bs=16):
    return Dispatcher(devs, num_groups=groups, num_layers=layers, block_size=bs, max_model_len=4096,
                      row_bytes=1024, policy=policy)


def test_higher_cost_gets_proportionally_fewer_groups():
    devs = [Device("fast", 10 ** 6, cost_per_token=1e-8, cost_per_group=0),
            Device("slow", 10 ** 6, cost_per_token=3e-8, cost_per_group=0)]
    c = counts(fill(make(devs), 60), 2)
    share = c[0] / sum(c)
    assert 0.70 <= share <= 0.80  # 3x the cost -> about a quarter of the groups
    assert c[1] > 0


def test_nearly_full_kv_receives_fewer_groups():
    need = -(-128 // 16)  # blocks per group of a 100 + 28 token request
    devs = [Device("a", 10 ** 6), Device("b", 10 ** 6), Device("nearly-full", 6 * need)]
    c = counts(fill(make(devs, groups=3), 50), 3)
    assert c[2] == 6 and c[0] > c[2] and c[1] > c[2]


def test_remote_latency_keeps_light_load_local_and_spills_under_load():
    devs = [Device("dense", 10 ** 6, cost_per_token=1e-7),
            Device("attn", 10 ** 6, cost_per_token=1e-7, remote=True, latency=2e-4, bandwidth=1e9)]
    d = make(devs, groups=3)
    light = fill(d, 1)
    assert light[0].placement == [0, 0, 0]
    heavy = fill(make(devs, groups=3), 40, prompt_len=500)
    assert counts(heavy, 2)[1] > 0


def test_a_slower_link_gets_fewer_groups():
    """The links bench/hosts.py measured through tc tbf (about 160 us of latency; 1 Gbit/s
    and 100 Mbit/s), a loaded primary: the 100 Mbit/s host gets fewer groups."""
    def remote_share(bandwidth):
        devs = [Device("dense", 10 ** 6, cost_per_token=1e-6),
                Device("attn", 10 ** 6, cost_per_token=1e-6, remote=True, latency=1.6e-4,
                       bandwidth=bandwidth)]
        c = counts(fill(make(devs, groups=3), 40, prompt_len=500), 2)
        return c[1] / sum(c)
    fast, slow = remote_share(0.13e9), remote_share(0.013e9)
    assert 0 < slow < fast


@pytest.mark.parametrize("policy", ["hetis", "round-robin", "local-only"])
def test_no_device_is_ever_over_committed(policy):
    rng = random.Random(0)
    bs = 16
    devs = [Device(f"d{i}", rng.randint(20, 200), cost_per_token=rng.uniform(1e-8, 1e-7),
                   remote=i > 0, latency=1e-4, bandwidth=1e9) for i in range(4)]
    d = make(devs, policy=policy, groups=4, bs=bs)
    running: list[Sequence] = []
    d.get_running = lambda: running
    waited = 0
    for step in range(400):
        if running and rng.random() < 0.4:
            running.pop(rng.randrange(len(running)))       # a request finishes
        s = seq(prompt_len=rng.randint(1, 300), max_tokens=rng.randint(1, 200))
        s.placement = d.place(s)
        if s.placement is None:
            waited += 1
            continue
        running.append(s)
        for i, dev in enumerate(devs):
            used = sum(-(-d.expected_len(r) // bs) for r in running for g in r.placement if g == i)
            assert used <= dev.capacity_blocks
    assert waited > 0  # memory really was short at times


def test_round_robin_and_local_only():
    devs = [Device("a", 10 ** 6), Device("b", 10 ** 6), Device("c", 10 ** 6)]
    assert fill(make(devs, policy="local-only", groups=3), 2)[1].placement == [0, 0, 0]
    rr = fill(make(devs, policy="round-robin", groups=3), 2)
    assert rr[0].placement == [0, 1, 2] and rr[1].placement == [0, 1, 2]
    with pytest.raises(ValueError, match="policy"):
        make(devs, policy="random")


def test_waits_when_memory_is_short():
    devs = [Device("tiny", 4)]
    d = make(devs, groups=1)
    d.get_running = lambda: []
    assert d.place(seq(prompt_len=100, max_tokens=28)) is None
