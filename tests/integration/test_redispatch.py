"""Re-dispatch over the mesh (real processes): head groups move between the dense worker and
attention workers over the tensor channels, and the tokens stay exactly those of hetis.LLM."""
from __future__ import annotations

import threading

import grpc

from hetis import SamplingParams
from hetis.mesh.redisproc import free_port
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc
from tests.helpers.cluster import Cluster, start_hetis_up, stream_tokens

BASE = "The history of the printing press begins in the fifteenth century, when "


def streams(llm, target: str, n: int, max_tokens: int) -> tuple[list, list, dict]:
    """``n`` concurrent streams (even ones greedy, odd ones seeded): (got, want, status)."""
    base = llm.tokenizer.encode(BASE)
    prompts = [base[: 4 + i] for i in range(n)]
    sampling = [dict(temperature=0, max_tokens=max_tokens, ignore_eos=True) if i % 2 == 0 else
                dict(temperature=0.8, top_p=0.95, seed=200 + i, max_tokens=max_tokens, ignore_eos=True)
                for i in range(n)]
    want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                              [SamplingParams(**sp) for sp in sampling])]
    got = [None] * n
    with grpc.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(
            i, stream_tokens(stub, prompts[i], sampling[i]))) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(600)
        st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
    return got, want, st


def test_a_memory_poor_dense_worker_moves_head_groups_instead_of_preempting(llm, tmp_path):
    # the dense worker's own KV holds about four of these sequences; admission reserves only
    # what a request holds now (--kv-headroom 0), so as they grow the device runs short and
    # the latest arrivals' groups move to the two roomy attention workers
    port = free_port()
    proc, _ = start_hetis_up(["--attn-workers", "2", "--kv-headroom", "0", "--dense-kv-tokens", "512",
                              "--dtype", "float32", "--port", str(port), "--log-dir", str(tmp_path)],
                             until="Hetis is up")
    try:
        got, want, st = streams(llm, f"127.0.0.1:{port}", 16, 16)
        assert got == want
        assert st.migrations > 0 and st.migrated_bytes > 0 and st.preemptions == 0, st
        assert st.steps.move_s > 0
    finally:
        proc.terminate()
        proc.wait(60)


def test_forced_moves_between_every_pair_of_devices_keep_tokens_exact(llm):
    # round-robin puts groups on all three devices; a move every other step cycles each
    # group on to the next device: dense -> attn-0 -> attn-1 -> dense (attention worker to
    # attention worker through the dense worker); groups over 16 tokens are pre-copied
    c = Cluster(attn_workers=2, policy="round-robin",
                router_args=("--migrate-every", "2", "--max-move-tokens", "16"))  # + pre-copies
    try:
        got, want, st = streams(llm, c.target, 4, 16)
        assert got == want
        assert st.migrations >= 4 and st.preemptions == 0, st
        assert all(w.kv_used_tokens == 0 and not w.resident for w in st.workers)
    finally:
        c.stop()
