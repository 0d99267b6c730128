"""The allocator as a real process on real gRPC, with a real redis-server."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hetis.defaults import ALLOCATOR_PORT
from hetis.mesh.redisproc import RedisProcess, free_port
from hetis.v1 import allocator_pb2 as pb
from hetis.v1 import allocator_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Allocator:
    def __init__(self, redis_url: str, round_seconds: float = 0.3):
        self.port, self.metrics_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.allocator", "--port", str(self.port), "--redis-url", redis_url,
             "--metrics-port", str(self.metrics_port), "--round-seconds", str(round_seconds),
             "--debounce-seconds", "0.1", "--log-level", "WARNING"], cwd=ROOT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = allocator_pb2_grpc.AllocatorStub(self.channel)

    def stop(self) -> int:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


def test_help_names_the_default_port():
    p = subprocess.run([sys.executable, "-m", "services.allocator", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"gRPC port (default {ALLOCATOR_PORT})" in p.stdout


@pytest.fixture(scope="module")
def redis_server():
    with RedisProcess() as r:
        yield r


@pytest.fixture(scope="module")
def alloc(redis_server):
    """One service for the module (starting one costs seconds); tests re-populate it."""
    a = Allocator(redis_server.url)
    yield a
    if a.proc.poll() is None:
        a.stop()


def tenant(name, thr, **kw):
    return pb.UpsertTenantRequest(tenant=pb.Tenant(name=name, throughput=thr, **kw))


def populate(stub):
    stub.SetInventory(pb.SetInventoryRequest(gpus={"v100": 4, "p100": 4, "k80": 8}))
    stub.UpsertTenant(tenant("alice", {"v100": 4.4, "p100": 2.6, "k80": 0.6}, max_gpus=6))
    stub.UpsertTenant(pb.UpsertTenantRequest(tenant=pb.Tenant(name="bob", job_type="ResNet-50 (batch size 64)",
                                                              jobs=[pb.Job(id="train", gpus=2)])))
    return stub.UpsertTenant(tenant("carol", {"v100": 1.2, "p100": 1.1, "k80": 1.0}, weight=2))


def test_health_reflection_and_metrics(alloc):
    health = health_pb2_grpc.HealthStub(alloc.channel)
    for name in ("", "hetis.v1.Allocator"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
            health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    refl = reflection_pb2_grpc.ServerReflectionStub(alloc.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "hetis.v1.Allocator" in {s.name for s in resp.list_services_response.service}
    populate(alloc.stub)
    alloc.stub.GetAllocation(pb.GetAllocationRequest())
    text = urllib.request.urlopen(f"http://127.0.0.1:{alloc.metrics_port}/metrics", timeout=5).read().decode()
    assert "hetis_allocator_solve_seconds" in text and "hetis_allocator_tenants 3.0" in text


@pytest.mark.parametrize("req, field", [
    (tenant("", {"v100": 1.0}), "tenant.name"),
    (tenant("a", {"v100": 1.0}, weight=-1), "tenant.weight"),
    (tenant("a", {"v100": -1.0}), "tenant.throughput.v100"),
    (tenant("a", {"v100": 0.0}), "tenant.throughput"),
    (tenant("a", {}), "tenant.throughput"),
    (tenant("a", {"v100": 1.0}, max_gpus=-2), "tenant.max_gpus"),
    (tenant("a", {"v100": 1.0}, jobs=[pb.Job(id="x", gpus=0)]), "tenant.jobs[0].gpus"),
    (tenant("a", {"v100": 1.0}, jobs=[pb.Job(id="x", gpus=1), pb.Job(id="x", gpus=1)]), "tenant.jobs[1].id"),
    (pb.UpsertTenantRequest(tenant=pb.Tenant(name="a", job_type="NoSuchNet")), "tenant.job_type"),
    (pb.UpsertTenantRequest(), "tenant"),
])
def test_invalid_tenants_are_rejected_naming_the_field(alloc, req, field):
    with pytest.raises(grpc.RpcError) as e:
        alloc.stub.UpsertTenant(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":"), e.value.details()


def test_other_errors(alloc):
    for req, field in [(pb.SetInventoryRequest(), "gpus"), (pb.SetInventoryRequest(gpus={"bad name": 1}), "gpus."),
                       (pb.SetInventoryRequest(gpus={"v100": 1}, prices={"k80": 1.0}), "prices.k80")]:
        with pytest.raises(grpc.RpcError) as e:
            alloc.stub.SetInventory(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
    with pytest.raises(grpc.RpcError) as e:
        alloc.stub.RemoveTenant(pb.RemoveTenantRequest(name="ghost"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        alloc.stub.GetAllocation(pb.GetAllocationRequest(mode="greedy"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("mode:")
    populate(alloc.stub)
    with pytest.raises(grpc.RpcError) as e:
        alloc.stub.Explain(pb.ExplainRequest(tenants=["ghost"]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_allocation_explain_and_modes(alloc):
    v = populate(alloc.stub).version
    a = alloc.stub.GetAllocation(pb.GetAllocationRequest())
    assert a.mode == "cooperative" and a.version == v and len(a.tenants) == 3
    for g, cap in {"v100": 4, "p100": 4, "k80": 8}.items():
        assert sum(t.gpus[g] for t in a.tenants) <= cap + 1e-6
    assert all(t.sharing_incentive and t.envy_free for t in a.tenants)
    bob = next(t for t in a.tenants if t.tenant == "bob")
    assert sum(bob.gpus.values()) <= 2 + 1e-6                   # capped by its one 2-GPU job
    ex = alloc.stub.Explain(pb.ExplainRequest(tenants=["alice"]))
    assert [t.tenant for t in ex.tenants] == ["alice"]
    assert ex.tenants[0].si_slack >= -1e-6 and ex.tenants[0].ef_slack >= -1e-6
    assert ex.tenants[0].speedup["k80"] == pytest.approx(1.0)
    mm = alloc.stub.GetAllocation(pb.GetAllocationRequest(mode="max-min"))
    assert mm.mode == "max-min" and a.efficiency >= mm.efficiency - 1e-6 or not all(
        t.envy_free for t in mm.tenants)
    v2 = alloc.stub.RemoveTenant(pb.RemoveTenantRequest(name="carol")).version
    after = alloc.stub.GetAllocation(pb.GetAllocationRequest())
    assert after.version == v2 and {t.tenant for t in after.tenants} == {"alice", "bob"}


def test_changes_trigger_a_debounced_recomputation(alloc, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    v = populate(alloc.stub).version
    deadline = time.time() + 10
    while time.time() < deadline:                 # nobody asked: the service recomputes by itself
        raw = r.get("hetis:allocator:allocation")
        if raw and json.loads(raw)["version"] == v:
            break
        time.sleep(0.05)
    saved = json.loads(r.get("hetis:allocator:allocation"))
    assert saved["version"] == v and saved["tenants"] == ["alice", "bob", "carol"]


def test_watch_streams_integer_rounds(alloc):
    populate(alloc.stub)
    stream = alloc.stub.WatchAllocation(pb.WatchAllocationRequest(), timeout=20)
    rounds = []
    for rnd in stream:
        if len(rnd.tenants) == 3:
            rounds.append(rnd)
        if len(rounds) == 3:
            break
    stream.cancel()
    assert [r.round for r in rounds] == sorted({r.round for r in rounds})
    for rnd in rounds:
        for g, cap in {"v100": 4, "p100": 4, "k80": 8}.items():
            assert sum(t.gpus[g] for t in rnd.tenants) <= cap
        bob = [g for g in rnd.grants if g.tenant == "bob"]
        assert all(g.job_id == "train" and g.gpus == 2 for g in bob) and len(bob) <= 1
        assert all(g.lease_expires_unix > rnd.started_unix for g in rnd.grants)


def test_state_survives_a_restart():
    with RedisProcess() as redis_server:
        restart_and_compare(redis_server)


def restart_and_compare(redis_server):
    a = Allocator(redis_server.url)
    version = populate(a.stub).version
    first = a.stub.GetAllocation(pb.GetAllocationRequest())
    stream = a.stub.WatchAllocation(pb.WatchAllocationRequest(), timeout=20)
    last = next(r for r in stream if len(r.tenants) == 3).round
    stream.cancel()
    assert a.stop() == 0
    b = Allocator(redis_server.url)
    try:
        again = b.stub.GetAllocation(pb.GetAllocationRequest())
        assert again.version == version and dict(again.inventory) == {"v100": 4, "p100": 4, "k80": 8}
        flat = lambda alloc: {(t.tenant, g): v for t in alloc.tenants for g, v in t.gpus.items()}  # noqa: E731
        assert flat(again) == pytest.approx(flat(first))
        rnd = next(b.stub.WatchAllocation(pb.WatchAllocationRequest(), timeout=20))
        assert rnd.round > last                      # the round counter and received totals carry on
    finally:
        b.stop()
