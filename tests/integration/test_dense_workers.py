"""Several dense workers (serving instances) sharing one attention worker, real processes:
`hetis up --dense-workers 2`, exact tokens, both instances used, shared KV never over-committed,
and the kill -9 of a dense worker mid-stream."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc

from hetis import SamplingParams
from hetis.mesh.redisproc import free_port
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.cluster import Cluster, start_hetis_up, stream_tokens

BASE = "The history of the printing press begins in the fifteenth century, when "


def test_hetis_up_two_dense_workers_share_one_attention_worker(llm, tmp_path):
    # a small attention cache (768 tokens x groups): 16 requests do not all fit at once,
    # so both instances compete for it under the router's one accounting
    port = free_port()
    proc, lines = start_hetis_up(["--dense-workers", "2", "--attn-workers", "1", "--policy",
                                  "round-robin", "--dtype", "float32", "--attn-kv-tokens", "768",
                                  "--port", str(port), "--log-dir", str(tmp_path)], until="Hetis is up")
    try:
        target = f"127.0.0.1:{port}"
        attn = next(x for x in lines if "attn-0 serving at" in x).split("serving at ")[1].strip()
        base = llm.tokenizer.encode(BASE)
        prompts = [base[: 4 + i] for i in range(16)]
        sp = dict(temperature=0, max_tokens=16, ignore_eos=True)
        want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                  SamplingParams(**sp))]
        got, samples, done = [None] * 16, [], threading.Event()

        def sample():  # the attention worker's own view of what it holds, while it serves
            with grpc.insecure_channel(attn) as ch:
                stub = worker_pb2_grpc.AttentionWorkerStub(ch)
                while not done.is_set():
                    s = stub.Stats(worker_pb2.StatsRequest(), timeout=10)
                    samples.append((s.kv_used_tokens, s.kv_total_tokens))
                    time.sleep(0.05)
        with grpc.insecure_channel(target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            sampler = threading.Thread(target=sample)
            sampler.start()
            threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, stream_tokens(stub, prompts[i], sp)))
                       for i in range(16)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(600)
            done.set()
            sampler.join(30)
        assert got == want
        assert samples and all(used <= total for used, total in samples), max(samples)
        assert max(used for used, _ in samples) > 0
        env = dict(os.environ, HETIS_TARGET=target)
        st = json.loads(subprocess.run([sys.executable, "-m", "hetis.cli", "status", "--json"],
                                       capture_output=True, text=True, env=env, check=True).stdout)
        dense = {w["id"]: w for w in st["workers"] if w["kind"] == "dense"}
        assert set(dense) == {"dense-0", "dense-1"}
        assert all(w["alive"] and w["steps"] > 0 and w["running"] == 0 for w in dense.values()), dense
        attn0 = next(w for w in st["workers"] if w["id"] == "attn-0")
        assert attn0["kv_used_tokens"] == 0 and attn0["kv_total_tokens"] == 768
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_kill_9_of_a_dense_worker_mid_stream_loses_no_request(llm):
    """Two dense workers, each tensor-parallel (two ranks, so each rank exchanges its own
    head groups with the attention worker); rank 0 of dense-1 is killed mid-stream."""
    c = Cluster(attn_workers=1, dense_workers=2, policy="round-robin", tp=2)
    N = 6  # streams: both instances hold some when the kill comes
    try:
        base = llm.tokenizer.encode(BASE)
        prompts = [base[: 4 + i] for i in range(N)]
        # even streams greedy, odd ones seeded sampling: both must come out exactly
        sampling = [dict(temperature=0, max_tokens=16, ignore_eos=True) if i % 2 == 0 else
                    dict(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=16, ignore_eos=True)
                    for i in range(N)]
        want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                  [SamplingParams(**sp) for sp in sampling])]
        got, errors, started = [None] * N, [], threading.Barrier(N + 1)
        with grpc.insecure_channel(c.target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)

            def one(i):
                try:
                    got[i] = stream_tokens(stub, prompts[i], sampling[i], started)
                except grpc.RpcError as e:
                    errors.append(e.details())
            threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
            for th in threads:
                th.start()
            started.wait(300)
            st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
            busy = {w.id: w.running + w.waiting for w in st.workers if w.kind == "dense"}
            assert busy["dense-1"] > 0, busy  # it has requests to lose
            victim = c.proc("dense-1")
            ranks = subprocess.run(["pgrep", "-P", str(victim.pid)], capture_output=True,
                                   text=True).stdout.split()
            assert len(ranks) == 1  # its rank 1
            victim.kill()
            for th in threads:
                th.join(600)
            assert not errors and got == want  # every stream whole, nothing repeated
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
                alive = {w.id: w.alive for w in st.workers}
                if not alive["dense-1"]:
                    break
                time.sleep(0.5)
            assert alive == {"dense-0": True, "attn-0": True, "dense-1": False}, alive
            attn0 = next(w for w in st.workers if w.id == "attn-0")
            assert attn0.kv_used_tokens == 0 and not attn0.resident  # its KV there was freed
            after = stream_tokens(stub, llm.tokenizer.encode("After the fault,"),
                            dict(temperature=0, max_tokens=8))
            assert after == llm.generate("After the fault,", SamplingParams(temperature=0, max_tokens=8))[0].token_ids
            deadline = time.monotonic() + 10  # its rank 1 did not outlive it
            while time.monotonic() < deadline and os.path.exists(f"/proc/{ranks[0]}"):
                time.sleep(0.2)
            assert not os.path.exists(f"/proc/{ranks[0]}")
    finally:
        c.stop()


def test_tp_2_without_attention_workers_is_exact(llm):
    c = Cluster(attn_workers=0, tp=2)
    try:
        prompts = [llm.tokenizer.encode(t) for t in ("The capital of France is", "def fib(n):",
                                                      "Once upon a time, in a land far away,")]
        sp = dict(temperature=0, max_tokens=16, ignore_eos=True)
        want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                  SamplingParams(**sp))]
        with grpc.insecure_channel(c.target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            got = [None] * len(prompts)
            threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, stream_tokens(stub, prompts[i], sp)))
                       for i in range(len(prompts))]
            for th in threads:
                th.start()
            for th in threads:
                th.join(300)
        assert got == want
    finally:
        c.stop()
