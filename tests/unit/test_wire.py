"""hetis/mesh/wire.py: every proto <-> library conversion round-trips and names bad fields."""
from __future__ import annotations

import pytest

from hetis.engine.snapshot import DeviceState, EngineSnapshot, InstanceState
from hetis.engine.sampling import ParamError, SamplingParams
from hetis.engine.step import AttnItem, Step, StepChunk, StepTimes
from hetis.mesh import wire
from hetis.mesh.fleet import StepStats
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import worker_pb2 as wpb


def test_sampling_round_trip_keeps_defaults_for_unset_fields():
    msg = wire.sampling_to_proto({"temperature": 0.5, "seed": 7, "stop": "x"})
    assert msg.HasField("temperature") and not msg.HasField("top_p") and not msg.HasField("max_tokens")
    back = wire.sampling_from_proto(msg)
    assert back == SamplingParams(temperature=0.5, seed=7, stop=["x"])
    assert wire.sampling_from_proto(pb.SamplingParams()) == SamplingParams()


def test_sampling_errors_name_the_field():
    with pytest.raises(TypeError, match="temprature"):
        wire.sampling_to_proto({"temprature": 1.0})
    with pytest.raises(ParamError, match="top_p") as e:
        wire.sampling_to_proto({"top_p": 2.0})
    assert e.value.param == "top_p"
    with pytest.raises(ParamError) as e:
        wire.sampling_from_proto(pb.SamplingParams(top_k=0))
    assert e.value.param == "sampling.top_k"
    with pytest.raises(ParamError, match="sampling.seed"):
        wire.sampling_from_proto(pb.SamplingParams(seed=2 ** 63))


def test_requests_from_the_sdk_and_back_in_the_router():
    req = wire.generate_request(None, [1, 2, 3], "r1", {"max_tokens": 4})
    assert wire.prompt_from_request(req) == (None, [1, 2, 3]) and req.request_id == "r1"
    req = wire.generate_request("hi", None, None, {})
    assert wire.prompt_from_request(req) == ("hi", None) and req.request_id == ""
    chat = wire.chat_request([{"role": "user", "content": "hi"}], None, {})
    assert wire.messages_from_proto(chat.messages) == [{"role": "user", "content": "hi"}]
    for bad, field in [(lambda: wire.generate_request("a", [1], None, {}), "prompt"),
                       (lambda: wire.generate_request(None, [-1], None, {}), "prompt_token_ids"),
                       (lambda: wire.chat_request([{"role": ""}], None, {}), "messages[0].role"),
                       (lambda: wire.chat_request([{"role": "usr", "content": "x"}], None, {}),
                        "messages[0].role"),
                       (lambda: wire.tokenize_request(None, None), "text"),
                       (lambda: wire.prompt_from_request(pb.GenerateRequest()), "prompt")]:
        with pytest.raises(ParamError) as e:
            bad()
        assert e.value.param == field


def test_step_round_trip():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=11)
    step = Step([StepChunk(4, 0, [1, 2, 3], True, sp), StepChunk(9, 17, [5], False)],
                [[AttnItem(4, 0, 0, 3, [7])], [], [AttnItem(4, 1, 0, 3, [2]), AttnItem(9, 2, 17, 1, [0, 1])]],
                freed=[1, 2])
    back = wire.step_from_proto(wire.step_to_proto(step, step_id=5), num_backends=3)
    assert back.freed == [1, 2] and back.work == step.work
    a, b = back.chunks
    assert (a.seq_id, a.start, a.token_ids, a.sample) == (4, 0, [1, 2, 3], True)
    assert (a.params.top_k, a.params.seed) == (5, 11)
    assert abs(a.params.temperature - 0.7) < 1e-6 and abs(a.params.top_p - 0.9) < 1e-6
    assert (b.seq_id, b.start, b.token_ids, b.sample, b.params) == (9, 17, [5], False, None)


def test_step_errors_name_the_field():
    empty = wpb.StepRequest()
    empty.chunks.add(seq_id=1, start=0)
    with pytest.raises(ParamError, match=r"chunks\[0\].token_ids"):
        wire.step_from_proto(empty, 1)
    far = wpb.StepRequest()
    far.work.add(backend=3)
    with pytest.raises(ParamError, match="work.backend: 3 but only 2"):
        wire.step_from_proto(far, 2)


def test_step_result_round_trip():
    t = StepTimes(total=1.0, local_attn=0.25, exchange_wait=0.125)
    toks, back = wire.step_result_from_proto(wire.step_result_to_proto(3, [5, 6], t))
    assert toks == [5, 6] and back == t and back.dense == 0.625


def test_join_round_trip_and_validation():
    shape = wire.AttentionShape(30, 3, 64, 16, "bfloat16")
    rv = wire.Rendezvous("10.0.0.1", 29500, 2, 3, "gloo", "g1")
    assert wire.join_from_proto(wire.join_to_proto(shape, rv)) == (shape, rv)
    with pytest.raises(ParamError, match="dtype"):
        wire.join_from_proto(wire.join_to_proto(wire.AttentionShape(30, 3, 64, 16, "fp8"), rv))
    with pytest.raises(ParamError, match="head_dim"):
        wire.join_from_proto(wire.join_to_proto(wire.AttentionShape(30, 3, 0, 16, "float32"), rv))


def test_cluster_status_from_a_snapshot():
    snap = EngineSnapshot("hetis", 2, 1, [DeviceState(32, 1600, 0.5, 1e-8, {"r": [0, 2]}),
                                          DeviceState(0, 3200, 0.0, 2e-8, {})],
                          [InstanceState("dense-0", 1, 2, 17, False)])
    workers = {"attn-0": {"kind": "attention", "alive": True, "address": "h:1", "device": "cpu"}}
    st = wire.cluster_status_to_proto(snap, "m", ["dense-0", "attn-0"],
                                      {"dense-0": "dense", "attn-0": "attention"}, workers,
                                      StepStats(steps=3))
    d = wire.message_to_dict(st)
    assert (d["policy"], d["waiting"], d["running"], d["steps"]["steps"]) == ("hetis", 2, 1, 3)
    dense, attn = d["workers"]
    assert dense["kind"] == "dense" and not dense["alive"]  # not in Redis: reported dead
    assert (dense["steps"], dense["running"], dense["waiting"]) == (17, 1, 2)
    assert attn["steps"] == 0 and attn["running"] == 0  # those are the dense workers' only
    assert dense["resident"] == [{"request_id": "r", "groups": [0, 2]}] and dense["kv_used_tokens"] == 32
    assert attn["alive"] and attn["address"] == "h:1" and attn["kv_total_tokens"] == 3200
