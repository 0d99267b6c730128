"""Continuous batching, chunked prefill and preemption keep every request's tokens."""
from __future__ import annotations

import pytest

from hetis import LLM, SamplingParams


def _requests(llm, n=16):
    base = ("In a quiet village by the sea, the fishermen told stories of storms and "
            "treasure, of lighthouses and long nights on the water. ") * 4
    ids = llm.tokenizer.encode(base)
    # different prompt lengths and different output lengths
    return ([{"prompt_token_ids": ids[: 5 + 9 * i]} for i in range(n)],
            [SamplingParams(temperature=0, max_tokens=4 + (i * 5) % 13, ignore_eos=True) for i in range(n)])


@pytest.fixture(scope="module")
def alone(llm):
    prompts, params = _requests(llm)
    return [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]


def test_sixteen_together_equal_each_alone(llm, alone):
    prompts, params = _requests(llm)
    together = llm.generate(prompts, params)
    assert [o.token_ids for o in together] == alone
    assert [len(o.token_ids) for o in together] == [p.max_tokens for p in params]
    assert all(o.finish_reason == "length" for o in together)


def test_small_kv_cache_preempts_and_still_completes(alone):
    small = LLM(kv_tokens=3 * 16 * 24, max_model_len=256, block_size=16)  # 24 blocks total
    prompts, params = _requests(small)
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    assert all(m.used_tokens == 0 for m in small.engine.managers)


def test_chunked_prefill_gives_the_same_tokens(alone):
    chunked = LLM(max_num_batched_tokens=24, max_num_seqs=4)
    prompts, params = _requests(chunked)
    assert [o.token_ids for o in chunked.generate(prompts, params)] == alone


def test_prompt_longer_than_max_model_len_is_rejected():
    short = LLM(max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        short.generate({"prompt_token_ids": list(range(40))})


def test_generation_stops_at_max_model_len():
    short = LLM(max_model_len=24)
    out = short.generate({"prompt_token_ids": list(range(100, 120))},
                         SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
