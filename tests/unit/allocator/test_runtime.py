"""The allocator's runtime and wire conversion in-process: no gRPC server, no Redis
(a dict stands in for the store). The service as a real process:
tests/integration/test_allocator_service.py."""
import json

import pytest

from hetis.allocator import wire
from hetis.allocator.runtime import AllocatorConfig, AllocatorRuntime, NotFound
from hetis.allocator.spec import SpecError
from hetis.defaults import ALLOCATOR_METRICS_PORT, ALLOCATOR_PORT, DENSE_WORKER_PORT
from hetis.v1 import allocator_pb2 as pb

GPUS = {"v100": 4, "p100": 4, "k80": 8}


class MemoryStore:
    """store.Store's methods over dicts."""

    def __init__(self):
        self.gpus, self.prices, self.specs, self.saved, self.v = {}, {}, {}, {}, 0

    def version(self):
        return self.v

    def set_inventory(self, gpus, prices):
        self.gpus, self.prices = dict(gpus), dict(prices or {})
        self.v += 1
        return self.v

    def inventory(self):
        return dict(sorted(self.gpus.items())), dict(self.prices)

    def upsert_tenant(self, t):
        created = t.name not in self.specs
        self.specs[t.name] = t
        self.v += 1
        return self.v, created

    def remove_tenant(self, name):
        if self.specs.pop(name, None) is None:
            return None
        self.v += 1
        return self.v

    def tenants(self):
        return [self.specs[k] for k in sorted(self.specs)]

    def save_json(self, key, value):
        self.saved[key] = json.loads(json.dumps(value))

    def load_json(self, key):
        return self.saved.get(key)

    def close(self):
        pass


def populate(rt):
    rt.set_inventory(*wire.inventory_from_pb(pb.SetInventoryRequest(gpus=GPUS)))
    for t in (pb.Tenant(name="alice", throughput={"v100": 4.4, "p100": 2.6, "k80": 0.6}, max_gpus=6),
              pb.Tenant(name="bob", job_type="ResNet-50 (batch size 64)", jobs=[pb.Job(id="train", gpus=2)]),
              pb.Tenant(name="carol", throughput={"v100": 1.2, "p100": 1.1, "k80": 1.0}, weight=2)):
        rt.upsert_tenant(wire.tenant_from_pb(pb.UpsertTenantRequest(tenant=t)))


@pytest.fixture
def rt():
    r = AllocatorRuntime(MemoryStore(), AllocatorConfig(round_seconds=3600, debounce_seconds=0))
    yield r
    r.close()


def test_config_defaults_and_validation():
    cfg = AllocatorConfig()
    assert (cfg.port, cfg.metrics_port, cfg.mode) == (ALLOCATOR_PORT, ALLOCATOR_METRICS_PORT, "cooperative")
    assert cfg.port != DENSE_WORKER_PORT
    for bad in ({"mode": "greedy"}, {"round_seconds": 0}, {"debounce_seconds": -1}):
        with pytest.raises(ValueError):
            AllocatorConfig(**bad)


def test_reads_see_writes_and_messages_carry_the_allocation(rt):
    populate(rt)
    snap, alloc = rt.solve()
    assert snap.version == 4 and alloc.mode == "cooperative"
    msg = wire.allocation_to_pb(snap, snap.mode, alloc)
    assert [t.tenant for t in msg.tenants] == ["alice", "bob", "carol"] and dict(msg.inventory) == GPUS
    assert all(t.sharing_incentive and t.envy_free for t in msg.tenants)
    assert sum(next(t for t in msg.tenants if t.tenant == "bob").gpus.values()) <= 2 + 1e-6
    ex = wire.explain_to_pb(snap, "max-min", rt.solve("max-min")[1], ["alice"])
    assert ex.mode == "max-min" and [t.tenant for t in ex.tenants] == ["alice"]
    assert rt.remove_tenant("carol") == 5
    snap, alloc = rt.solve()
    assert snap.version == 5 and list(snap.problem.tenants) == ["alice", "bob"] and alloc.x.shape == (2, 3)


def test_errors_name_the_field(rt):
    populate(rt)
    with pytest.raises(SpecError, match="^mode: unknown 'greedy'"):
        rt.solve("greedy")
    with pytest.raises(NotFound, match="^name: no tenant 'ghost'"):
        rt.remove_tenant("ghost")
    with pytest.raises(NotFound, match="^tenants: no tenant 'ghost'"):
        rt.solve()[0].require(["alice", "ghost"])
    with pytest.raises(SpecError, match=r"^tenant\.weight:"):
        wire.tenant_from_pb(pb.UpsertTenantRequest(tenant=pb.Tenant(name="a", weight=-1, throughput={"v100": 1})))
    with pytest.raises(SpecError, match="^name: required"):
        wire.tenant_name_from_pb(pb.RemoveTenantRequest())


def test_rounds_are_integer_and_carry_on_in_a_new_runtime(rt):
    populate(rt)
    assert rt.wait_round(0, timeout=10) is not None     # the round thread's first round
    first = rt.run_round()
    assert rt.wait_round(first.round - 1, timeout=0) is first and rt.wait_round(first.round, timeout=0) is None
    msg = wire.round_to_pb(first, rt.snap)
    for g, cap in GPUS.items():
        assert sum(t.gpus[g] for t in msg.tenants) <= cap
    assert [(g.job_id, g.gpus) for g in msg.grants if g.tenant == "bob"] in ([], [("train", 2)])
    again = AllocatorRuntime(rt.store, AllocatorConfig(round_seconds=3600))
    try:
        assert again.run_round().round > first.round
    finally:
        again.close()


def test_the_outcome_says_which_stage_produced_the_allocation(rt):
    populate(rt)
    snap, alloc = rt.solve()
    msg = wire.allocation_to_pb(snap, snap.mode, alloc)
    # bob's job takes 2 GPUs at once: the job-blind x is kept only as a mix of feasible
    # rounds (here it is one: the fair optimum, then checked for Pareto efficiency)
    assert msg.outcome.stage == "fair_optimum" and msg.outcome.solver == "lp"
    assert msg.outcome.implementable and msg.outcome.si_fraction == pytest.approx(1.0)
    assert msg.outcome.HasField("optimality_gap") and msg.outcome.optimality_gap == 0
    assert msg.outcome.HasField("pareto_efficient")
    rt.upsert_tenant(wire.tenant_from_pb(pb.UpsertTenantRequest(tenant=pb.Tenant(
        name="bob", job_type="ResNet-50 (batch size 64)", jobs=[pb.Job(id="train", gpus=1)]))))
    snap, alloc = rt.solve()
    msg = wire.allocation_to_pb(snap, snap.mode, alloc)         # 1-GPU jobs: the job-blind stages
    assert msg.outcome.stage in ("fair_optimum", "pareto_refinement") and msg.outcome.solver in ("lp", "milp", "ceei")
    assert msg.outcome.HasField("optimality_gap") and 0 <= msg.outcome.optimality_gap < 0.5
    assert msg.outcome.pareto_efficient and not msg.outcome.HasField("implementable")
    ex = wire.explain_to_pb(snap, snap.mode, alloc, [])
    assert ex.outcome == msg.outcome
    other = wire.allocation_to_pb(snap, "equal", rt.solve("equal")[1]).outcome
    assert other.stage == "exact" and not other.HasField("optimality_gap") and not other.HasField("pareto_efficient")


def test_without_an_allocation_the_round_thread_sleeps_instead_of_spinning():
    r = AllocatorRuntime(MemoryStore(), AllocatorConfig(round_seconds=3600, debounce_seconds=0))
    calls = []
    run = r.run_round
    r.run_round = lambda: calls.append(1) or run()
    try:
        import time
        time.sleep(0.3)
        assert len(calls) <= 2          # the old loop called it thousands of times a second
    finally:
        r.close()


def test_a_recompute_starts_from_the_previous_solution(rt):
    populate(rt)
    first = rt.current().alloc
    assert first.info["warm"]           # the EF rows it ended with, by tenant name
    rt.upsert_tenant(wire.tenant_from_pb(pb.UpsertTenantRequest(tenant=pb.Tenant(
        name="dave", throughput={"v100": 2.0, "p100": 1.5, "k80": 1.0}))))
    again = rt.current().alloc
    assert again.info["lp_solves"] >= 1 and again.x.shape == (4, 3)
