"""kv_cache_dtype="int8" on the real model: how far its greedy tokens are from the float32
reference's (teacher-forced on the int8 engine's own continuation)."""
from __future__ import annotations

import pytest
import torch

from hetis import LLM, SamplingParams

from .test_quant import _attend


@pytest.fixture(scope="module")
def int8_llm():
    return LLM(dtype="float32", kv_cache_dtype="int8")


def test_int8_cache_greedy_tokens_are_the_references_up_to_near_ties(llm, int8_llm, prompts):
    """Every token the int8-cache engine picks is the full-precision model's best on the
    same context, or within 0.1 % of its best logit (a near tie the quantisation may
    flip); and most streams match the float32 engine's token for token."""
    model = llm.engine.executor.model
    assert int8_llm.engine.executor.backends[0].store.k.dtype == torch.int8
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    same = total = 0
    for p in prompts:
        a = int8_llm.generate({"prompt_token_ids": p}, sp)[0].token_ids
        b = llm.generate({"prompt_token_ids": p}, sp)[0].token_ids
        ids = p + a
        with torch.inference_mode():
            logits = model.forward(torch.tensor(ids), torch.arange(len(ids)),
                                   torch.arange(len(p) - 1, len(ids) - 1), _attend)
        best = logits.max(-1).values
        chosen = logits[torch.arange(len(a)), torch.tensor(a)]
        gap = float(((best - chosen) / best.abs()).max())
        assert gap <= 1e-3, (len(p), gap)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        same, total = same + n, total + len(b)
    assert same / total >= 0.75, (same, total)


def test_unknown_kv_cache_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(kv_cache_dtype="fp8")
