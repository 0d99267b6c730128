"""--kv-cache-dtype int8 on every worker of a real mesh (hetis up's command lines): the
attention worker's and the dense worker's caches are int8, and a request's tokens are
those of hetis.LLM with the same cache (quantisation is per cached row, so where a head
group lives does not change what it computes)."""
from __future__ import annotations

import grpc
import pytest

from hetis import LLM, SamplingParams
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.cluster import Cluster

N_TOK = 12


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(attn_workers=1, policy="round-robin", kv_cache_dtype="int8")
    yield c
    c.stop()


def test_int8_caches_across_the_mesh_give_the_in_process_int8_tokens(cluster, prompts):
    ref = LLM(dtype="float32", kv_cache_dtype="int8")
    sp = SamplingParams(temperature=0, max_tokens=N_TOK, ignore_eos=True)
    for name, argv in cluster.local.commands:
        if name != "router":
            assert argv[argv.index("--kv-cache-dtype") + 1] == "int8", name
    with grpc.insecure_channel(cluster.target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        for p in prompts[:3]:
            req = pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0, max_tokens=N_TOK, ignore_eos=True))
            req.prompt_token_ids.ids.extend(p)
            got = [t for c in stub.Generate(req, timeout=300) for t in c.token_ids]
            assert got == ref.generate({"prompt_token_ids": p}, sp)[0].token_ids
    with open(f"{cluster.log_dir}/attn-0.log") as f:
        log = f.read()
    assert "int8 rows with float32 scales" in log
    # the attention worker computed its groups itself: no channel failed over to the
    # dense worker (which would give the same tokens, by recovery)
    assert "tensor channel" in log and "ended" not in log, log[-2000:]
    with grpc.insecure_channel(cluster.attn_addrs[0]) as ch:
        s = worker_pb2_grpc.AttentionWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10)
    assert s.joined and s.steps >= 3 * N_TOK
    with open(f"{cluster.log_dir}/router.log") as f:
        router_log = f.read()
    assert "lost" not in router_log.lower() and "failed" not in router_log.lower(), router_log[-2000:]
