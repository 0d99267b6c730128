"""The mesh with real processes, real gRPC, real gloo and a real redis-server."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from hetis import SamplingParams
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.cluster import Cluster
from tests.helpers.reference import hf_greedy

N_TOK = 16


def greedy(n=N_TOK, **kw):
    return pb.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def run(stub, ids=None, prompt=None, sampling=None, timeout=300):
    req = pb.GenerateRequest(sampling=sampling or greedy())
    if ids is not None:
        req.prompt_token_ids.ids.extend(ids)
    else:
        req.prompt = prompt
    toks, text, last = [], "", None
    for c in stub.Generate(req, timeout=timeout):
        toks += c.token_ids
        text += c.text
        last = c
    assert last.finished
    return toks, text, last.finish_reason


# 0 attention workers (all local) and 2 (round-robin: remote groups on both, and local
# ones); a single worker showed nothing the two do not, at a third of the file's time.
# The 0-attn mesh runs one request at a time with a queue of one (every test on it sends
# one request at a time; test_queue_limit_gives_resource_exhausted bursts into it), so
# the queue limit needs no mesh of its own.
@pytest.fixture(scope="module", params=[(0, "hetis", ("--max-queue", "1", "--max-num-seqs", "1")),
                                        (2, "round-robin", ("--max-queue", "64"))],
                ids=["0-attn", "2-attn"])
def cluster(request, tmp_path_factory):
    n, policy, router_args = request.param
    step_log = tmp_path_factory.mktemp("steps") / "steps.jsonl"   # the simulator's calibration
    router_args = (*router_args, "--step-log", str(step_log))
    c = Cluster(attn_workers=n, policy=policy, router_args=router_args)
    c.n_attn, c.step_log = n, step_log
    with grpc.insecure_channel(c.target) as ch:
        c.stub = generation_pb2_grpc.GenerationStub(ch)
        yield c
    c.stop()


@pytest.fixture(scope="module")
def expected(llm, prompts, hf_model):
    """Reference tokens for the first three prompts: transformers and hetis.LLM agree."""
    ids = prompts[:2] + prompts[4:5]
    ref = [hf_greedy(hf_model, p, N_TOK) for p in ids]
    ours = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ids],
                                              SamplingParams(temperature=0, max_tokens=N_TOK, ignore_eos=True))]
    assert ours == ref
    return ids, ref


def test_tokens_identical_to_llm_and_transformers(cluster, expected):
    ids, ref = expected
    got = [run(cluster.stub, p)[0] for p in ids]
    assert got == ref
    b = cluster.stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10).steps
    assert b.steps >= 3 * N_TOK // 2 and b.step_call_s >= b.dense_worker_s > b.dense_compute_s > 0
    if cluster.n_attn:
        assert b.exchange_wait_s > 0


def test_head_groups_resident_on_attention_workers(cluster, llm):
    """While a request runs, cluster status shows its groups spread over the workers."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", run(cluster.stub, prompt="Tell me a story.",
                                                                  sampling=greedy(24))))
    t.start()
    seen: dict[str, set] = {}
    deadline = time.monotonic() + 120
    while t.is_alive() and time.monotonic() < deadline:
        st = cluster.stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        for w in st.workers:
            for r in w.resident:
                seen.setdefault(w.id, set()).update(r.groups)
        if len(seen) == cluster.n_attn + 1:
            break
        time.sleep(0.2)
    t.join()
    assert len(st.workers) == cluster.n_attn + 1
    assert [w.kind for w in st.workers] == ["dense"] + ["attention"] * cluster.n_attn
    assert all(w.alive and w.address and w.kv_total_tokens > 0 for w in st.workers)
    attn_ids = [w.id for w in st.workers if w.kind == "attention"]
    for wid in attn_ids:
        assert seen.get(wid), f"no head group was ever resident on {wid}"
    all_groups = set().union(*seen.values()) if seen else set()
    assert all_groups == {0, 1, 2}
    # the attention workers really computed: their own stats count steps
    for addr in cluster.attn_addrs:
        with grpc.insecure_channel(addr) as ch:
            s = worker_pb2_grpc.AttentionWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10)
        assert s.joined and s.steps > 0
    ref = llm.generate("Tell me a story.", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert box["r"][0] == ref.token_ids


def test_sixteen_concurrent_streams(cluster, llm):
    if cluster.n_attn != 2:
        pytest.skip("run once, on the largest mesh")
    base = llm.tokenizer.encode("The history of the printing press begins in the fifteenth century, when ")
    prompts = [base[: 4 + i] for i in range(16)]
    lens = [4 + (i * 7) % 13 for i in range(16)]  # 4..16 tokens: streams end at different steps
    want = [o.token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens])]
    got = [None] * 16

    def one(i):
        got[i] = run(cluster.stub, prompts[i], sampling=greedy(lens[i]))[0]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == want


def test_seeded_sampling_matches_in_process(cluster, llm):
    sp = dict(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16, seed=7, ignore_eos=True)
    want = llm.generate("A haiku about rain:", SamplingParams(**sp))[0].token_ids
    got = run(cluster.stub, prompt="A haiku about rain:", sampling=pb.SamplingParams(**sp))[0]
    assert got == want


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.sampling.MergeFrom(pb.SamplingParams(temperature=-1)), "temperature"),
    (lambda r: r.sampling.MergeFrom(pb.SamplingParams(top_p=2)), "top_p"),
    (lambda r: r.sampling.MergeFrom(pb.SamplingParams(max_tokens=0)), "max_tokens"),
    (lambda r: r.prompt_token_ids.ids.extend([10 ** 7]), "prompt_token_ids"),
    (lambda r: setattr(r, "prompt", ""), "prompt"),
    (lambda r: r.sampling.stop.append(""), "stop"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(cluster, mutate, field):
    if cluster.n_attn != 0:
        pytest.skip("validation is the router's; one mesh is enough")
    req = pb.GenerateRequest(prompt="hello")
    mutate(req)
    with pytest.raises(grpc.RpcError) as e:
        list(cluster.stub.Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    assert run(cluster.stub, prompt="still serving", sampling=greedy(2))[2] == "length"


def test_bad_chat_is_invalid_argument(cluster):
    if cluster.n_attn != 0:
        pytest.skip("validation is the router's")
    with pytest.raises(grpc.RpcError) as e:
        list(cluster.stub.Chat(pb.ChatRequest(), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in e.value.details()


def test_cancelled_stream_frees_kv_everywhere(cluster):
    call = cluster.stub.Generate(pb.GenerateRequest(prompt="Count to a thousand:", sampling=greedy(1500)),
                                 timeout=300)
    for i, _ in enumerate(call):
        if i == 3:
            break
    call.cancel()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = cluster.stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        if st.running == 0 and all(w.kv_used_tokens == 0 and not w.resident for w in st.workers):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"KV still held after cancel: {st}")
    for addr in cluster.attn_addrs:  # the workers themselves dropped the sequence
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with grpc.insecure_channel(addr) as ch:
                s = worker_pb2_grpc.AttentionWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10)
            if s.kv_used_tokens == 0:
                break
            time.sleep(0.2)
        assert s.kv_used_tokens == 0 and not s.resident_seq_ids


def test_model_info_and_tokenize(cluster, llm):
    if cluster.n_attn != 0:
        pytest.skip("router-only calls")
    info = cluster.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (30, 3, 64) and info.has_chat_template
    tk = cluster.stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=10)
    assert list(tk.token_ids) == llm.tokenizer.encode("Hello world")
    msgs = [pb.ChatMessage(role="user", content="Hi")]
    tk = cluster.stub.Tokenize(pb.TokenizeRequest(messages=msgs), timeout=10)
    assert list(tk.token_ids) == llm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])


def test_queue_limit_gives_resource_exhausted(cluster):
    """The 0-attn mesh runs one request and queues one (--max-num-seqs 1 --max-queue 1): a
    burst of six is partly refused, the rest served, and the mesh serves on."""
    if cluster.n_attn != 0:
        pytest.skip("the queue is the router's; the 0-attn mesh has the small one")
    codes = []

    def one():
        try:
            run(cluster.stub, prompt="Write a long essay.", sampling=greedy(12))
            codes.append("ok")
        except grpc.RpcError as e:
            codes.append(e.code())
    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert "ok" in codes
    assert run(cluster.stub, prompt="after the burst", sampling=greedy(2))[2] == "length"


def test_dense_worker_rejects_a_bad_step_and_keeps_serving(cluster):
    if cluster.n_attn != 0:
        pytest.skip("one mesh is enough")
    dense = next(c.address for c in cluster.local.children if c.name == "dense-0")
    with grpc.insecure_channel(dense) as ch:
        stub = worker_pb2_grpc.DenseWorkerStub(ch)
        bad = worker_pb2.StepRequest(step_id=1)
        bad.chunks.add(seq_id=10 ** 9, start=0, token_ids=[1, 2], sample=True, temperature=0)
        bad.work.add(backend=7).items.add(seq_id=10 ** 9, group=0, start=0, num_new=2, blocks=[0])
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(bad, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "work.backend" in e.value.details()
        empty = worker_pb2.StepRequest(step_id=2)
        empty.chunks.add(seq_id=10 ** 9, start=0, sample=True)
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(empty, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.details()
    assert run(cluster.stub, prompt="still here", sampling=greedy(2))[2] == "length"


def test_more_streams_than_threads_and_health_stays_fast(cluster, llm):
    """The router is on asyncio: 48 streams at once (the threaded router had 32 threads and
    request 33 waited), and the health service answers while they run."""
    if cluster.n_attn != 2:
        pytest.skip("one mesh is enough")
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hetis import AsyncClient
    prompts = [f"Fact number {i}: the" for i in range(48)]
    want = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6,
                                                                     ignore_eos=True))]
    health_ok = []

    async def main():
        async with AsyncClient(cluster.target) as c:
            streams = [asyncio.ensure_future(c.generate(p, max_tokens=6, temperature=0, ignore_eos=True))
                       for p in prompts]
            async with grpc.aio.insecure_channel(cluster.target) as ch:
                hs = health_pb2_grpc.HealthStub(ch)
                while not all(s.done() for s in streams):
                    r = await hs.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    health_ok.append(r.status == health_pb2.HealthCheckResponse.SERVING)
                    await asyncio.sleep(0.05)
            return [(await s).token_ids for s in streams]
    assert asyncio.run(main()) == want
    assert health_ok and all(health_ok)


def test_one_bad_request_cannot_fail_the_others(cluster, llm):
    """8 healthy greedy streams beside a temperature of 1e-45 (greedy: below 1e-5), a 50 MB
    prompt (refused before tokenizing) and bytes that are no GenerateRequest."""
    if cluster.n_attn != 2:
        pytest.skip("one mesh is enough")
    base = llm.tokenizer.encode("Once upon a time in a quiet village by the sea, ")
    prompts = [base[: 6 + i] for i in range(8)]
    want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]
    got, errors = [None] * 8, {}

    def healthy(i):
        got[i] = run(cluster.stub, prompts[i], sampling=greedy(12))[0]

    def tiny_temperature():
        got_tiny = run(cluster.stub, prompts[0], sampling=pb.SamplingParams(
            temperature=1e-45, max_tokens=12, ignore_eos=True))[0]
        errors["tiny"] = got_tiny

    def huge_prompt():
        try:
            run(cluster.stub, prompt="x" * (50 << 20), timeout=120)
        except grpc.RpcError as e:
            errors["huge"] = (e.code(), e.details())

    threads = [threading.Thread(target=healthy, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=tiny_temperature), threading.Thread(target=huge_prompt)]
    for th in threads:
        th.start()
    with grpc.insecure_channel(cluster.target) as ch:
        raw = ch.unary_stream("/hetis.v1.Generation/Generate")
        with pytest.raises(grpc.RpcError) as e:
            list(raw(b"\xff\xff\xff\xff", timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "GenerateRequest" in e.value.details()
    for th in threads:
        th.join()
    assert got == want
    assert errors["tiny"] == want[0]  # a temperature below 1e-5 is greedy
    code, details = errors["huge"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max-prompt-chars" in details


def test_stop_strings_match_in_process(cluster, llm):
    """The router detokenises and checks stop strings on its event loop (the engine runs
    without text): the cut, the tokens and the streamed text equal hetis.LLM's, and the
    stop string's text is never streamed, even in part."""
    if cluster.n_attn != 0:
        pytest.skip("text handling is the router's own: run once")
    prompt = "The history of the printing press begins in the fifteenth century, when "
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    words = full.text.split()
    stops = [words[len(words) // 2] + " " + words[len(words) // 2 + 1], "zzzq"]
    sp = dict(temperature=0, max_tokens=24, ignore_eos=True, stop=stops)
    want = llm.generate(prompt, SamplingParams(**sp))[0]
    assert want.finish_reason == "stop" and len(want.token_ids) < 24
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(**sp))
    chunks = list(cluster.stub.Generate(req, timeout=300))
    text = "".join(c.text for c in chunks)
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert text == want.text and stops[0] not in text
    assert chunks[-1].finished and chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == len(want.token_ids)
    assert all(not c.finished for c in chunks[:-1])
    # the engine let go of it: nothing left running
    st = cluster.stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)
    assert st.running == 0 and all(not w.resident for w in st.workers)


def test_step_log_has_one_line_per_step_with_its_shape(cluster, llm, prompts):
    """`--step-log`: one JSON line per executed step, [seconds, tokens, sampled sequences,
    KV tokens read, decode (sequence, group) pairs, prefill attention flops]; for one
    request alone the lines add up to its prompt and its tokens."""
    import json

    def lines() -> int:
        return len(cluster.step_log.read_text().splitlines()) if cluster.step_log.exists() else 0
    before, deadline = lines(), time.monotonic() + 60
    while time.monotonic() < deadline:   # earlier tests' last steps (a cancelled stream's) first
        time.sleep(1.0)
        if lines() == before:
            break
        before = lines()
    ids = prompts[1]
    toks, _, _ = run(cluster.stub, ids=ids)
    rows = [json.loads(line) for line in cluster.step_log.read_text().splitlines()[before:]]
    groups = llm.model_config.num_kv_heads
    assert rows and all(len(r) == 6 and r[0] > 0 for r in rows)
    assert sum(r[1] for r in rows) == len(ids) + len(toks) - 1     # the prompt, then one token a step
    assert sum(r[2] for r in rows) == len(toks)                    # a token sampled per step
    decode = [r for r in rows if r[4]]
    assert len(decode) == len(toks) - 1 and all(r[4] == groups for r in decode)
    # each decode step reads the context so far, its own new key included, per group
    assert sorted(r[3] for r in decode) == [groups * (len(ids) + k + 1) for k in range(len(toks) - 1)]
    assert sum(r[5] for r in rows) > 0 and all(r[5] == 0 for r in decode)
