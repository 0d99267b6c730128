"""Faults with real processes: the mesh keeps serving through them."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest

from hetis import SamplingParams
from hetis.mesh.redisproc import RedisProcess, free_port
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc
from tests.helpers.cluster import Cluster


def _wait_alive(stub, ids: set[str], timeout: float = 120):
    deadline, st = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        if ids <= {w.id for w in st.workers if w.alive}:
            return st
        time.sleep(0.5)
    raise AssertionError(f"{ids} not alive in time: {st}")


def _attn_steps(address: str) -> int:
    from hetis.v1 import worker_pb2, worker_pb2_grpc
    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.AttentionWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10).steps


def _greedy(stub, prompt: str, n: int) -> list[int]:
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(temperature=0, max_tokens=n,
                                                                       ignore_eos=True))
    return [t for chunk in stub.Generate(req, timeout=300) for t in chunk.token_ids]


def _streams_through_a_fault(llm, fault, dense_args=(), then=None, n=4, tokens=16):
    """``n`` streams (half greedy, half seeded) on a mesh with two attention workers
    (round-robin: both hold groups); ``fault(cluster)`` hits attn-1 once every stream has
    produced tokens."""
    c = Cluster(attn_workers=2, policy="round-robin", dense_args=dense_args)
    try:
        base = llm.tokenizer.encode("The history of the printing press begins in the fifteenth century, when ")
        prompts = [base[: 4 + i] for i in range(n)]
        # even streams greedy, odd ones seeded sampling: both must come out exactly
        sampling = [dict(temperature=0, max_tokens=tokens, ignore_eos=True) if i % 2 == 0 else
                    dict(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=tokens, ignore_eos=True)
                    for i in range(n)]
        want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                  [SamplingParams(**sp) for sp in sampling])]
        got, started, errors = [None] * n, threading.Barrier(n + 1), []
        with grpc.insecure_channel(c.target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)

            def one(i):
                req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling[i]))
                req.prompt_token_ids.ids.extend(prompts[i])
                toks = []
                try:
                    for n, chunk in enumerate(stub.Generate(req, timeout=600)):
                        toks += chunk.token_ids
                        if n == 2:
                            started.wait(120)
                except grpc.RpcError as e:
                    errors.append(e.details())
                got[i] = toks
            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for th in threads:
                th.start()
            started.wait(300)
            fault(c)
            for th in threads:
                th.join(600)
            assert not errors and got == want      # every stream whole, nothing repeated
            after = [t for chunk in stub.Generate(pb.GenerateRequest(
                prompt="After the fault,", sampling=pb.SamplingParams(temperature=0, max_tokens=8)),
                timeout=120) for t in chunk.token_ids]
            assert after == llm.generate("After the fault,", SamplingParams(temperature=0, max_tokens=8))[0].token_ids
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
                alive = {w.id: w.alive for w in st.workers}
                if not alive["attn-1"]:
                    break
                time.sleep(0.5)
            assert alive == {"dense-0": True, "attn-0": True, "attn-1": False}, alive
            attn1 = next(w for w in st.workers if w.id == "attn-1")
            assert not attn1.resident and attn1.kv_used_tokens == 0
            if then is not None:
                then(c, stub)
    finally:
        c.stop()


def test_kill_9_of_an_attention_worker_loses_no_stream_and_a_restart_rejoins(llm):
    def restart(c, stub):  # the same command again: it takes its old device back
        child = next(ch for ch in c.local.children if ch.name == "attn-1")
        child.proc.wait(10)
        child.proc = subprocess.Popen(child.argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        st = _wait_alive(stub, {"attn-1"})
        assert [w.id for w in st.workers] == ["dense-0", "attn-0", "attn-1"]
        want = llm.generate("A restarted worker", SamplingParams(temperature=0, max_tokens=12,
                                                                 ignore_eos=True))[0].token_ids
        assert _greedy(stub, "A restarted worker", 12) == want
        assert _attn_steps(child.address) > 0  # round-robin put groups on it again
    _streams_through_a_fault(llm, lambda c: c.proc("attn-1").kill(), then=restart)


def test_a_frozen_attention_worker_is_lost_after_the_peer_timeout(llm):
    import signal

    def freeze(c):
        c.proc("attn-1").send_signal(signal.SIGSTOP)

    def kill_the_frozen(c, stub):  # else the mesh's stop waits out its SIGTERM grace on it
        c.proc("attn-1").kill()
    _streams_through_a_fault(llm, freeze, dense_args=("--peer-timeout", "3"), then=kill_the_frozen)


def test_sigterm_drains_an_attention_worker_by_moving_its_head_groups(llm):
    import signal

    def sigterm(c):
        p = c.proc("attn-1")
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0  # it left by itself, once drained
        log = next(ch for ch in c.local.children if ch.name == "attn-1").tail(200)
        assert "drained: nothing left here" in log, log  # moved away before it left

    def moved_not_recomputed(c, stub):
        st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        assert st.migrations > 0 and st.migrated_bytes > 0 and st.preemptions == 0, st
    _streams_through_a_fault(llm, sigterm, then=moved_not_recomputed)


# The three tests below share one mesh with one attention worker (round-robin): each leaves
# every worker alive and serving, and the late worker's test, which leaves it registered and
# dead once stopped, comes last.
@pytest.fixture(scope="module")
def mesh1():
    c = Cluster(attn_workers=1, policy="round-robin")
    yield c
    c.stop()


def test_redis_restart_loses_no_stream_and_status_recovers(llm, mesh1):
    c = mesh1
    prompt = "The rain in Spain falls mainly on the"
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    with grpc.insecure_channel(c.target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        got = {}

        def stream():
            req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
                temperature=0, max_tokens=16, ignore_eos=True))
            got["ids"] = [t for chunk in stub.Generate(req, timeout=300) for t in chunk.token_ids]
        th = threading.Thread(target=stream)
        th.start()
        port = c.redis.port
        c.redis.stop()                           # Redis gone (no persistence: all keys lost)
        time.sleep(1.0)
        c.redis = RedisProcess(port=port)        # back, empty, on the same port
        th.join(300)
        assert got["ids"] == want.token_ids      # the stream never noticed
        deadline, st = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            try:
                st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=5)
                if st.workers and all(w.alive for w in st.workers):
                    break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            time.sleep(0.5)
        assert st is not None and len(st.workers) == 2 and all(w.alive for w in st.workers), st
        assert {w.address for w in st.workers} and all(w.address for w in st.workers)
        again = [t for chunk in stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
            temperature=0, max_tokens=8, ignore_eos=True)), timeout=120) for t in chunk.token_ids]
        assert again == want.token_ids[:8]


def test_a_restarted_dense_worker_is_used_again_without_restarting_the_router(llm, mesh1):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def health(hstub):
        return hstub.Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def wait_health(hstub, status, timeout):
        deadline = time.monotonic() + timeout
        while health(hstub) != status:
            assert time.monotonic() < deadline, f"health never became {status}"
            time.sleep(0.2)

    c = mesh1
    want = llm.generate("Before and after", SamplingParams(temperature=0, max_tokens=10,
                                                           ignore_eos=True))[0].token_ids
    with grpc.insecure_channel(c.target) as ch:
        stub, hstub = generation_pb2_grpc.GenerationStub(ch), health_pb2_grpc.HealthStub(ch)
        assert _greedy(stub, "Before and after", 10) == want
        dense = next(child for child in c.local.children if child.name == "dense-0")
        dense.proc.kill()
        dense.proc.wait(10)
        wait_health(hstub, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        with pytest.raises(grpc.RpcError) as e:
            _greedy(stub, "While it is gone", 4)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "dense worker" in e.value.details()
        dense.proc = subprocess.Popen(dense.argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_health(hstub, health_pb2.HealthCheckResponse.SERVING, 180)
        _wait_alive(stub, {"dense-0", "attn-0"})
        attn = next(child.address for child in c.local.children if child.name == "attn-0")
        before = _attn_steps(attn)
        assert _greedy(stub, "Before and after", 10) == want
        assert _attn_steps(attn) > before  # the attention worker is in the new dense worker's mesh


def test_an_attention_worker_started_later_joins_dispatch(llm, mesh1):
    c = mesh1
    late = None
    try:
        port = free_port()
        late = subprocess.Popen([sys.executable, "-m", "services.attn_worker", "--port", str(port),
                                 "--redis-url", c.redis.url, "--worker-id", "attn-late",
                                 "--advertise-host", "127.0.0.1", "--threads", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        with grpc.insecure_channel(c.target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            st = _wait_alive(stub, {"dense-0", "attn-0", "attn-late"})
            assert [w.id for w in st.workers] == ["dense-0", "attn-0", "attn-late"]
            prompts = ["The late worker", "holds head groups", "of new requests"]
            want = [o.token_ids for o in llm.generate(prompts, SamplingParams(
                temperature=0, max_tokens=10, ignore_eos=True))]
            assert [_greedy(stub, p, 10) for p in prompts] == want
            assert _attn_steps(f"127.0.0.1:{port}") > 0
    finally:
        if late is not None:
            late.terminate()
            late.wait(30)
