"""The client SDK and the `hetis` CLI against a tiny real gRPC server (no mocks of gRPC):
validation, error mapping, retries, deadlines, streaming, cancellation; and `hetis up`'s
process management with stand-in services (real child processes)."""
from __future__ import annotations

import asyncio
import collections
import io
import json
import sys
import threading
import time

import grpc
import pytest

from hetis import client as hc
from hetis.cli import main
from hetis.mesh.redisproc import free_port
from hetis.mesh.service import Service
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc as pb_grpc

WORDS = ["Hello", " world", "!"]


class FakeGeneration(pb_grpc.GenerationServicer):
    """Answers by prompt: 'invalid', 'busy', 'missing' abort; 'drop' fails after one chunk;
    'slow' sleeps; 'forever' streams until cancelled; anything else streams WORDS."""

    def __init__(self):
        self.calls = collections.Counter()
        self.fail_first = {}          # method -> how many first calls fail with UNAVAILABLE
        self.requests = []
        self.cancelled = threading.Event()

    def _enter(self, method, context):
        self.calls[method] += 1
        if self.calls[method] <= self.fail_first.get(method, 0):
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    def _stream(self, words, prompt_tokens, context, drop=False):
        for i, w in enumerate(words):
            if drop and i == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "attention worker lost")
            yield pb.GenerateChunk(request_id="r-1", token_ids=[i + 1], text=w,
                                   prompt_tokens=prompt_tokens, completion_tokens=i + 1)
        yield pb.GenerateChunk(request_id="r-1", finished=True, finish_reason="length",
                               prompt_tokens=prompt_tokens, completion_tokens=len(words))

    def Generate(self, request, context):
        self._enter("Generate", context)
        self.requests.append(request)
        p = request.prompt
        if p == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: longer than max_model_len")
        if p == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full\n(64 waiting)")
        if p == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        if p == "slow":
            time.sleep(1.0)
        if p == "forever":
            context.add_callback(self.cancelled.set)
            while context.is_active():
                yield pb.GenerateChunk(request_id="r-1", token_ids=[7], text="la")
                time.sleep(0.02)
            return
        n = len(p.split()) if p else len(request.prompt_token_ids.ids)
        yield from self._stream(WORDS, n, context, drop=(p == "drop"))

    def Chat(self, request, context):
        self._enter("Chat", context)
        self.requests.append(request)
        yield from self._stream(["you said ", request.messages[-1].content], len(request.messages),
                                context)

    def Tokenize(self, request, context):
        self._enter("Tokenize", context)
        if request.messages:
            return pb.TokenizeResponse(token_ids=[len(m.content) for m in request.messages])
        return pb.TokenizeResponse(token_ids=[len(w) for w in request.text.split()])

    def GetModelInfo(self, request, context):
        self._enter("GetModelInfo", context)
        return pb.ModelInfo(name="fake", dtype="float32", num_layers=2, num_heads=4,
                            num_kv_heads=2, eos_token_ids=[2], has_chat_template=True)

    def GetClusterStatus(self, request, context):
        self._enter("GetClusterStatus", context)
        return pb.ClusterStatus(model="fake", policy="hetis", waiting=1, running=2, workers=[
            pb.WorkerStatus(id="dense-0", kind="dense", device="cpu", address="127.0.0.1:1",
                            alive=True, kv_used_tokens=10, kv_total_tokens=100, load=0.001),
            pb.WorkerStatus(id="attn-0", kind="attention", device="cpu", address="127.0.0.1:2",
                            alive=False, resident=[pb.ResidentGroups(request_id="r-1", groups=[0, 2])],
                            kv_used_tokens=2 ** 40, kv_total_tokens=2 ** 41)])


def start_server(servicer, port=0) -> Service:
    return Service("fake-router", port,
                   [lambda s: pb_grpc.add_GenerationServicer_to_server(servicer, s)],
                   ["hetis.v1.Generation"], host="127.0.0.1", max_workers=8).start()


@pytest.fixture
def fake():
    servicer = FakeGeneration()
    svc = start_server(servicer)
    servicer.address = f"127.0.0.1:{svc.port}"
    yield servicer
    svc.stop(grace=0)


# ------------------------------------------------------------------ local validation
def test_validation_without_server():
    with hc.Client("127.0.0.1:1", retries=0) as c:
        for kw, field in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                          ({"top_k": 0}, "top_k"), ({"max_tokens": 0}, "max_tokens"),
                          ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"),
                          ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"ignore_eos": 1}, "ignore_eos")]:
            with pytest.raises(ValueError, match=field) as e:
                c.generate("hi", **kw)
            assert isinstance(e.value, hc.InvalidArgument)
        with pytest.raises(TypeError, match="bogus.*frequency_penalty|frequency_penalty.*bogus"):
            c.generate("hi", bogus=1, frequency_penalty=0.5)
        with pytest.raises(TypeError, match="stop_list"):
            c.stream("hi", stop_list=["x"])
        with pytest.raises(ValueError, match="prompt"):
            c.generate()
        with pytest.raises(ValueError, match="prompt"):
            c.generate("hi", prompt_token_ids=[1])
        with pytest.raises(ValueError, match="prompt_token_ids"):
            c.generate(prompt_token_ids=[1, -2])
        with pytest.raises(ValueError, match=r"messages\[1\]"):
            c.chat([{"role": "user", "content": "x"}, {"role": "user"}])
        with pytest.raises(ValueError, match="text"):
            c.tokenize()
    with pytest.raises(ValueError, match="timeout"):
        hc.Client(timeout=0)


def test_sampling_maps_to_optional_fields(fake):
    with hc.Client(fake.address) as c:
        c.generate("a b", temperature=0, seed=7, stop="x", stop_token_ids=[5])
        c.generate(prompt_token_ids=[1, 2, 3])
    s = fake.requests[0].sampling
    assert s.HasField("temperature") and s.temperature == 0 and s.seed == 7
    assert list(s.stop) == ["x"] and list(s.stop_token_ids) == [5]
    assert not s.HasField("top_p") and not s.HasField("max_tokens")  # server applies defaults
    assert list(fake.requests[1].prompt_token_ids.ids) == [1, 2, 3]
    assert not fake.requests[1].sampling.HasField("seed")


# ------------------------------------------------------------------ results and streaming
def test_generate_stream_chat_and_unary_calls(fake):
    with hc.Client(fake.address) as c:
        out = c.generate("one two three", max_tokens=3)
        assert (out.text, out.token_ids, out.finish_reason) == ("Hello world!", [1, 2, 3], "length")
        assert (out.request_id, out.prompt_tokens, out.completion_tokens) == ("r-1", 3, 3)
        chunks = list(c.stream("x"))
        assert [ch.text for ch in chunks] == WORDS + [""]
        assert [ch.finished for ch in chunks] == [False] * 3 + [True]
        assert chunks[-1].finish_reason == "length" and chunks[0].finish_reason is None
        reply = c.chat([{"role": "user", "content": "hi"}], temperature=0)
        assert reply.text == "you said hi"
        assert "".join(ch.text for ch in c.stream_chat([{"role": "user", "content": "yo"}])) == "you said yo"
        assert c.tokenize("ab cde") == [2, 3]
        assert c.tokenize(messages=[{"role": "user", "content": "abcd"}]) == [4]
        info = c.model_info()
        assert info["name"] == "fake" and info["eos_token_ids"] == [2] and info["vocab_size"] == 0
        st = c.cluster_status()
        assert st["workers"][1]["resident"] == [{"request_id": "r-1", "groups": [0, 2]}]
        assert st["workers"][1]["kv_used_tokens"] == 2 ** 40  # uint64 stays an int
        assert (st["waiting"], st["running"], st["policy"]) == (1, 2, "hetis")


def test_breaking_out_of_a_stream_cancels_it(fake):
    with hc.Client(fake.address) as c:
        stream = c.stream("forever")
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        assert fake.cancelled.wait(5)


# ------------------------------------------------------------------ error mapping
def test_status_codes_map_to_exceptions(fake):
    with hc.Client(fake.address) as c:
        with pytest.raises(hc.InvalidArgument, match="max_model_len") as e:
            c.generate("invalid")
        assert isinstance(e.value, ValueError) and isinstance(e.value, hc.HetisError)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(hc.ResourceExhausted, match="queue full") as e:
            c.generate("busy")
        assert e.value.details.startswith("queue full")
        with pytest.raises(hc.NotFound):
            list(c.stream("missing"))
        with pytest.raises(hc.DeadlineExceeded):
            c.generate("slow", timeout=0.2)
    assert fake.calls["Generate"] == 4  # none of those is retried


# ------------------------------------------------------------------ retries
def test_idempotent_call_retried_on_unavailable(fake):
    fake.fail_first["Tokenize"] = 2
    with hc.Client(fake.address, retries=3, backoff=0.05) as c:
        assert c.tokenize("a bb") == [1, 2]
    assert fake.calls["Tokenize"] == 3
    fake.fail_first["GetModelInfo"] = 5
    with hc.Client(fake.address, retries=2, backoff=0.05) as c:
        with pytest.raises(hc.Unavailable, match="warming up"):
            c.model_info()
    assert fake.calls["GetModelInfo"] == 3


def test_retry_reaches_a_server_started_after_the_first_attempt():
    port = free_port()
    servicer = FakeGeneration()
    started = []
    timer = threading.Timer(0.4, lambda: started.append(start_server(servicer, port)))
    try:
        with hc.Client(f"127.0.0.1:{port}", retries=6, backoff=0.1) as c:
            timer.start()
            t0 = time.monotonic()
            assert c.tokenize("abc") == [3]
            assert time.monotonic() - t0 >= 0.3  # the first attempt(s) failed
    finally:
        timer.join()
        for s in started:
            s.stop(grace=0)


def test_generation_retried_only_before_the_first_chunk(fake):
    fake.fail_first["Generate"] = 2
    with hc.Client(fake.address, backoff=0.05) as c:
        assert c.generate("x").text == "Hello world!"
        assert fake.calls["Generate"] == 3
        got = []
        with pytest.raises(hc.Unavailable, match="worker lost"):
            for ch in c.stream("drop"):
                got.append(ch.text)
        assert got == ["Hello"]
        assert fake.calls["Generate"] == 4  # not retried after a chunk
        with pytest.raises(hc.Unavailable):
            c.generate("drop")
        assert fake.calls["Generate"] == 5


# ------------------------------------------------------------------ asyncio client
def test_async_client(fake):
    async def go():
        fake.fail_first["Tokenize"] = 1
        async with hc.AsyncClient(fake.address, backoff=0.05) as c:
            out = await c.generate("a b", temperature=0)
            assert (out.text, out.finish_reason) == ("Hello world!", "length")
            texts = [ch.text async for ch in c.stream(prompt_token_ids=[1, 2])]
            assert texts == WORDS + [""]
            assert (await c.chat([{"role": "user", "content": "q"}])).text == "you said q"
            assert await c.tokenize("xy") == [2]
            assert (await c.model_info())["num_layers"] == 2
            assert len((await c.cluster_status())["workers"]) == 2
            with pytest.raises(hc.ResourceExhausted):
                await c.generate("busy")
            with pytest.raises(hc.Unavailable):
                async for _ in c.stream("drop"):
                    pass
            with pytest.raises(ValueError, match="top_p"):
                c.stream("x", top_p=2)
            with pytest.raises(TypeError, match="nope"):
                await c.generate("x", nope=1)
    asyncio.run(go())
    assert fake.calls["Tokenize"] == 2


# ------------------------------------------------------------------ CLI
@pytest.mark.parametrize("argv", [
    ["nonsense"], [], ["generate"], ["generate", "hi", "--max-tokens", "abc"],
    ["generate", "hi", "--temperature", "-1"], ["generate", "hi", "--top-k", "0"],
    ["chat", "--top-p", "1.5"], ["up", "--attn-workers", "-1"], ["up", "--dtype", "float16"],
    ["up", "--policy", "best"], ["up", "--port", "70000"], ["status", "--bogus"],
])
def test_cli_bad_input_exits_2(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_cli_generate_streams(fake, capsys):
    assert main(["generate", "a b", "--target", fake.address, "--temperature", "0",
                 "--stop", "x", "y", "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == "Hello world!\n" and "length: 3 tokens" in out.err
    s = fake.requests[-1].sampling
    assert s.max_tokens == 128 and s.temperature == 0 and list(s.stop) == ["x", "y"] and s.seed == 3
    assert main(["generate", "a", "--no-stream", "--target", fake.address]) == 0
    assert capsys.readouterr().out == "Hello world!\n"


def test_cli_target_from_env(fake, capsys, monkeypatch):
    monkeypatch.setenv("HETIS_TARGET", fake.address)
    assert main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert [w["id"] for w in st["workers"]] == ["dense-0", "attn-0"]


def test_cli_status_table(fake, capsys):
    assert main(["status", "--target", fake.address]) == 0
    out = capsys.readouterr().out
    for s in ["dense-0", "attn-0", "attention", "1 req / 2 grp", "10/100 (10%)", "hetis",
              "2 running, 1 waiting"]:
        assert s in out


def test_cli_server_errors_exit_1_with_one_line(fake, capsys):
    assert main(["generate", "busy", "--target", fake.address]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: RESOURCE_EXHAUSTED: queue full (64 waiting)"]
    assert main(["status", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE")


def test_cli_chat_keeps_history(fake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nagain\n/exit\nnot sent\n"))
    assert main(["chat", "--system", "be brief", "--target", fake.address]) == 0
    assert capsys.readouterr().out == "you said hello\nyou said again\n"
    second = fake.requests[-1]
    assert [(m.role, m.content) for m in second.messages] == [
        ("system", "be brief"), ("user", "hello"), ("assistant", "you said hello"), ("user", "again")]
    assert fake.calls["Chat"] == 2


def test_cli_allocate_is_wired():
    from hetis.cli import build_parser
    args = build_parser().parse_args(["allocate", "pool.yaml", "--json"])
    assert args.command == "allocate" and callable(args.func)


def test_healthcheck(fake):
    from hetis.healthcheck import main as hc_main
    assert hc_main([fake.address]) == 0
    assert hc_main([fake.address, "--service", "hetis.v1.Generation"]) == 0
    assert hc_main([fake.address, "--service", "nope"]) == 1
    assert hc_main([f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1


# ------------------------------------------------------------------ hetis up (process management)
def test_service_commands():
    from hetis.cli import build_parser
    from hetis.up import service_commands
    args = build_parser().parse_args(["up", "--attn-workers", "3", "--redis-url", "redis://r:1/0",
                                      "--threads", "2", "--policy", "round-robin"])
    cmds = service_commands(args, ports={"dense-0": 6000})
    assert [n for n, _ in cmds] == ["attn-0", "attn-1", "attn-2", "dense-0", "router"]
    assert all(argv[:2] == [sys.executable, "-m"] for _, argv in cmds)
    router = cmds[-1][1]
    assert router[2] == "services.router" and "--model" not in router
    assert router[router.index("--dense-worker") + 1] == "127.0.0.1:6000"
    assert router[router.index("--attn-workers") + 1] == "3"
    assert router[router.index("--port") + 1] == "50051"
    assert len({argv[argv.index("--port") + 1] for _, argv in cmds}) == 5
    args.model = "/m.gguf"
    dense = service_commands(args)[3][1]
    assert dense[dense.index("--model") + 1] == "/m.gguf" and "--dtype" in dense


def test_hetis_up_passes_re_dispatch_and_weights_flags_to_the_services():
    """What `hetis up` puts on the router's and dense worker's command lines parses back, in
    their own parsers, to the values asked for; defaults stay off the command line."""
    from hetis.cli import build_parser
    from hetis.up import service_commands
    from services.dense_worker.__main__ import parse as parse_dense
    from services.router.__main__ import parse as parse_router
    base = ["up", "--redis-url", "redis://r:1/0"]
    cmds = dict(service_commands(build_parser().parse_args(base)))
    assert not {"--kv-headroom", "--rebalance-threshold", "--no-kv-balance", "--weights"} & set(
        cmds["router"] + cmds["dense-0"])
    args = build_parser().parse_args(base + ["--kv-headroom", "0", "--rebalance-threshold", "0.25",
                                             "--no-kv-balance", "--max-move-tokens", "512",
                                             "--weights", "gguf"])
    cmds = dict(service_commands(args))
    r = parse_router(cmds["router"][3:])
    assert (r.kv_headroom, r.rebalance_threshold, r.kv_balance, r.max_move_tokens) == (0, 0.25, False, 512)
    assert parse_dense(cmds["dense-0"][3:]).weights == "gguf"
