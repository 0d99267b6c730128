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
