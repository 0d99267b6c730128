"""Sampling parameters, seeds, stops and incremental detokenisation."""
from __future__ import annotations

import pytest

from hetis import SamplingParams
from hetis.model.tokenizer import IncrementalDetokenizer

PROMPT = "Write a short poem about the ocean:"


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPT, sp)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=10, seed=s) for s in (1, 2, 3)]
    b = llm.generate(["Hello", PROMPT, "Bonjour", "Hola"], [others[0], sp, others[1], others[2]])[1]
    assert a == b.token_ids
    c = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=99,
                                            ignore_eos=True))[0].token_ids
    assert c != a


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0].token_ids
    k1 = llm.generate(PROMPT, SamplingParams(temperature=0.8, top_k=1, max_tokens=12, seed=5))[0].token_ids
    assert k1 == greedy


def test_stop_string_is_honoured_and_excluded(llm):
    full = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    words = full.text.split()
    stop = words[len(words) // 2]
    cut = full.text.index(stop)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "zzzq"],
                                              ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert stop not in out.text
    assert out.token_ids == full.token_ids[:len(out.token_ids)]


def test_stop_token_ids_and_eos(llm):
    full = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    target = full.token_ids[5]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[target]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == target
    assert len(out.token_ids) == full.token_ids.index(target) + 1
    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=64))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in chat.text


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"seed": -3}, "seed"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos")])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_name_the_field(llm):
    with pytest.raises(ValueError, match="prompts"):
        llm.generate([42])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [10 ** 9]})
    with pytest.raises(ValueError, match="messages"):
        llm.chat([{"role": "user"}])


def test_incremental_detokenizer_never_splits_a_character(llm):
    tok = llm.tokenizer
    text = "Café naïve — 日本語のテキスト 🎉🚀 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step([i]) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # multi-token characters were held back
