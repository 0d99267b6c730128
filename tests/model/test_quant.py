"""weights="gguf": the real model's Q4_1 projections served by the int4 kernel for small bf16
matmuls (hetis/model/quant.py), against the same weights dequantised."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetis import LLM, SamplingParams
from hetis.model.loader import load


@pytest.fixture(scope="module")
def bf16():
    return LLM(dtype="bfloat16"), LLM(dtype="bfloat16", weights="gguf")


def _attend(i, q, k, v):
    T, H, D = q.shape
    rep = H // k.shape[1]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
                                       v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True)
    return o.transpose(0, 1).reshape(T, H * D)


def test_one_row_logits_within_bf16_rounding_of_the_dequantised_weights(bf16, prompts):
    """A one-token step goes through the int4 kernel in every projection, and the LM head
    through the GGUF's own Q8_0 values (the dense model's: those rounded to bf16) where the
    GEMMs run in bf16; on CPUs without native bf16 (AVX2: compute dtype float32) the Q8_0
    head is not used (dense.py) and the head is the dequantised one."""
    dense, int4 = (m.engine.executor.model for m in bf16)
    assert (int4.lm_head_q8 is not None) == (int4.compute_dtype == torch.bfloat16)
    assert dense.lm_head_q8 is None
    worst = 0.0
    for p in prompts:
        args = (torch.tensor(p[:1]), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), _attend)
        a, b = int4.forward(*args), dense.forward(*args)
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
        assert a.argmax() == b.argmax()
    assert worst < 0.05, worst


def test_one_stream_greedy_tokens_agree_with_the_dequantised_model_up_to_near_ties(bf16, prompts):
    """Decode of one stream runs on the int4 kernel; its bf16 rounding differs from the
    dense GEMM's, so where the dense model's two best logits are (nearly) tied the
    greedy token may flip (the long prompt's second token is an exact bf16 tie). Every
    divergence must be such a flip, to the dense model's runner-up, and most tokens agree."""
    dense, int4 = bf16
    model = dense.engine.executor.model
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    same = total = 0
    for p in prompts[:4]:
        a = int4.generate({"prompt_token_ids": p}, sp)[0].token_ids
        b = dense.generate({"prompt_token_ids": p}, sp)[0].token_ids
        assert a[0] == b[0]   # from the prefill, whose projections' GEMMs are the same
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        if n < len(b):
            ids = p + b[:n]
            logits = model.forward(torch.tensor(ids), torch.arange(len(ids)), torch.tensor([len(ids) - 1]),
                                   _attend)[0]
            top = logits.topk(2)
            assert a[n] in top.indices.tolist(), (n, a[n], top)
            assert float(top.values[0] - top.values[1]) <= 0.02 * float(top.values[0].abs()), (n, top)
        same, total = same + n, total + len(b)
    assert same / total >= 0.5, (same, total)


def test_gguf_weights_need_a_gguf_file_and_no_tensor_parallelism(bf16, tmp_path):
    with pytest.raises(ValueError, match="weights: must be one of"):
        load(None, torch.float32, weights="int3")
    with pytest.raises(ValueError, match="needs a .gguf model"):
        load(str(tmp_path), torch.float32, weights="gguf")
    from hetis.model.tp import shard
    with pytest.raises(ValueError, match="not sharded for tensor parallelism"):
        shard(bf16[1].engine.executor.model, 0, 2, lambda t: t)
