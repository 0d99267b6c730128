"""The mesh across two hosts (network namespaces joined by a shaped veth link; see
tests/helpers/hosts.py): router, dense worker and Redis on host A, two attention workers on
host B, every service given its address and nothing else (no GLOO_SOCKET_IFNAME)."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from hetis import SamplingParams
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc
from tests.helpers.cluster import stream_tokens
from tests.helpers.hosts import Across, HostPair, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))
PROMPT = "The history of the printing press begins in the fifteenth century, when "


@pytest.fixture(scope="module")
def hosts():
    h = HostPair(rate="1gbit")
    yield h
    h.close()


@pytest.fixture(scope="module")
def mesh(hosts):
    """One mesh across the hosts for the file: the exact-tokens test uses it as it is, then
    the cut test partitions it (and heals it). A lost channel in 4 s, not 10."""
    m = Across(hosts, dense_args=("--peer-timeout", "4"))
    yield m
    m.stop()


def _stream(stub, ids, n, started=None) -> list[int]:
    return stream_tokens(stub, ids, dict(temperature=0, max_tokens=n, ignore_eos=True), started)


def test_attention_workers_on_another_host_give_exact_tokens(hosts, mesh, llm):
    base = llm.tokenizer.encode(PROMPT)
    prompts = [base[: 6 + 3 * i] for i in range(4)]
    want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                              SamplingParams(temperature=0, max_tokens=16,
                                                             ignore_eos=True))]
    with grpc.insecure_channel(mesh.target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        got = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _stream(stub, prompts[i], 16)))
                   for i in range(len(prompts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
    assert got == want
    assert all(s > 0 for s in mesh.attn_steps())  # round-robin: both on B held groups
    addrs = {w.id: w.address for w in st.workers}
    assert addrs["attn-0"].startswith(hosts.b + ":") and addrs["dense-0"].startswith(hosts.a + ":")


def test_a_host_cut_off_loses_its_workers_and_they_rejoin_when_it_returns(hosts, mesh, llm):
    base = llm.tokenizer.encode(PROMPT)
    prompts = [base[: 4 + i] for i in range(8)]
    want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                              SamplingParams(temperature=0, max_tokens=32,
                                                             ignore_eos=True))]
    got, errors, started = [None] * 8, [], threading.Barrier(9)
    with grpc.insecure_channel(mesh.target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)

        def one(i):
            try:
                got[i] = _stream(stub, prompts[i], 32, started)
            except grpc.RpcError as e:
                errors.append(e.details())
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        started.wait(300)
        before = mesh.attn_steps()
        hosts.cut()
        cut_at = time.monotonic()
        for th in threads:
            th.join(300)
        done_in = time.monotonic() - cut_at
        assert not errors and got == want  # every stream whole and exact, B still away
        st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        alive = {w.id: w.alive for w in st.workers}
        assert alive == {"dense-0": True, "attn-0": False, "attn-1": False}, alive
        hosts.heal()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # B's workers register again and rejoin
            st = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
            if all(w.alive for w in st.workers):
                break
            time.sleep(0.5)
        assert all(w.alive for w in st.workers), st
        assert all(w.kv_used_tokens == 0 and not w.resident for w in st.workers)  # nothing stale
        again = [_stream(stub, p, 16) for p in prompts[:2]]
        assert again == [w[:16] for w in want[:2]]
        after = mesh.attn_steps()
        assert all(a > b for a, b in zip(after, before)), (before, after)  # B serves again
    print(f"streams done {done_in:.1f} s after the cut")
