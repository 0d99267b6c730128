"""Faults with real processes: the mesh keeps serving through them."""
from __future__ import annotations

import threading
import time

import grpc

from hetis import SamplingParams
from hetis.mesh.redisproc import RedisProcess
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc
from tests.helpers.cluster import Cluster


def test_redis_restart_loses_no_stream_and_status_recovers(llm):
    c = Cluster(attn_workers=1, policy="round-robin")
    try:
        prompt = "The rain in Spain falls mainly on the"
        want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0]
        with grpc.insecure_channel(c.target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            got = {}

            def stream():
                req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
                    temperature=0, max_tokens=48, ignore_eos=True))
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
    finally:
        c.stop()


def _streams_through_a_fault(llm, fault, dense_args=()):
    """16 greedy streams on a mesh with two attention workers (round-robin: both hold
    groups); ``fault(cluster)`` hits attn-1 once every stream has produced tokens."""
    c = Cluster(attn_workers=2, policy="round-robin", dense_args=dense_args)
    try:
        base = llm.tokenizer.encode("The history of the printing press begins in the fifteenth century, when ")
        prompts = [base[: 4 + i] for i in range(16)]
        want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                  SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))]
        got, started, errors = [None] * 16, threading.Barrier(17), []
        with grpc.insecure_channel(c.target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)

            def one(i):
                req = pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0, max_tokens=40,
                                                                    ignore_eos=True))
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
            threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
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
    finally:
        c.stop()


def test_kill_9_of_an_attention_worker_loses_no_stream(llm):
    _streams_through_a_fault(llm, lambda c: c.proc("attn-1").kill())


def test_a_frozen_attention_worker_is_lost_after_the_peer_timeout(llm):
    import signal

    def freeze(c):
        c.proc("attn-1").send_signal(signal.SIGSTOP)
    _streams_through_a_fault(llm, freeze, dense_args=("--peer-timeout", "3"))
