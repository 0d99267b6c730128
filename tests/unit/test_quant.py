"""GGUF Q4_0/Q4_1 blocks as int4 weight-only matmuls (hetis/model/quant.py), on random blocks:
the values are exactly gguf's dequantisation, the matmul is within float32 rounding of it."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from hetis.model.quant import Int4Weight, from_gguf, linear


def random_blocks(rng, type_name: str, n: int, k: int) -> np.ndarray:
    per = 20 if type_name == "Q4_1" else 18
    raw = rng.integers(0, 256, (n, k // 32, per), dtype=np.uint8)
    head = 4 if type_name == "Q4_1" else 2  # d (and m): sane float16 values, not NaN bit patterns
    vals = rng.uniform(-0.05, 0.05, (n, k // 32, head // 2)).astype(np.float16)
    raw[..., :head] = vals.view(np.uint8).reshape(n, k // 32, head)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_gguf_blocks_become_int4_exactly(type_name):
    rng = np.random.default_rng(0)
    n, k = 96, 256
    raw = random_blocks(rng, type_name, n, k)
    want = np.asarray(gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, type_name)),
                      dtype=np.float32).reshape(n, k)
    w = from_gguf(raw, type_name, (n, k))
    assert np.array_equal(w.dequantize().numpy(), want)
    x = torch.randn(7, k)
    ref = x @ torch.from_numpy(want).t()
    got = linear(x, w)
    assert got.shape == (7, n) and torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    # rows stack (fused projections) and reorder (q/k un-permutation) like the dense weights
    both = Int4Weight.cat([from_gguf(raw, type_name, (n, k)), from_gguf(raw, type_name, (n, k)).rows(
        np.arange(n)[::-1].copy())])
    assert torch.allclose(linear(x, both), torch.cat([ref, ref.flip(1)], 1), rtol=1e-4, atol=1e-4)


def test_bad_shapes_and_places_are_refused():
    with pytest.raises(ValueError, match="not whole blocks of 32"):
        from_gguf(np.zeros((2, 20), np.uint8), "Q4_1", (2, 40))
    w = from_gguf(np.zeros((2, 20), np.uint8), "Q4_1", (2, 32))
    with pytest.raises(ValueError, match="weights: 'gguf'"):
        w.prepare("cuda:0", torch.bfloat16, torch.bfloat16)


def test_the_int4_kernel_serves_small_bf16_matmuls_and_the_dense_copy_the_rest():
    rng = np.random.default_rng(1)
    raw = random_blocks(rng, "Q4_1", 64, 128)
    w = from_gguf(raw, "Q4_1", (64, 128)).prepare("cpu", torch.bfloat16, torch.bfloat16)
    assert w.q is None and w.dense.dtype == torch.bfloat16
    calls = []
    kernel = w.matmul
    w.matmul = lambda x: calls.append(x.shape[0]) or kernel(x)
    torch.manual_seed(0)
    for rows in (1, 4, 5, 64):
        x = torch.randn(rows, 128, dtype=torch.bfloat16)
        got = linear(x, w)
        ref = torch.nn.functional.linear(x.float(), w.dense.float())
        # bf16 results (and the kernel's bf16 intermediates): a few bf16 ulps of the row's scale
        assert torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    assert calls == [1, 4]
    f32 = from_gguf(raw, "Q4_1", (64, 128)).prepare("cpu", torch.float32, torch.float32)
    assert f32._packed is None  # float32: the dense copy, exactly weights="dense"


def test_q8_0_blocks_and_the_q8_linear_kernel():
    """A Q8_0 LM head kept as it is: the values are exactly gguf's dequantisation, and the
    fused_ops kernel's logits are theirs in float32 (bf16 and float32 rows, 1 to 5 of them,
    a row count that is not a multiple of the kernel's threads)."""
    import shutil

    from hetis.model import cpu_kernels
    from hetis.model.quant import q8_from_gguf
    if not cpu_kernels.supports(torch.empty(1), "fused_ops"):
        assert shutil.which("g++") is None and shutil.which("c++") is None, "a compiler is here: it must build"
        pytest.skip("no C++ compiler: the LM head stays dense")
    rng = np.random.default_rng(1)
    n, k = 301, 192
    raw = rng.integers(0, 256, (n, k // 32, 34), dtype=np.uint8)
    raw[..., :2] = rng.uniform(-0.05, 0.05, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(n, -1)
    want = np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0), dtype=np.float32).reshape(n, k)
    w = q8_from_gguf(raw, (n, k))
    assert w.q.dtype == torch.int8 and np.array_equal(w.dequantize().numpy(), want)
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 2, 5):
            x = torch.randn(rows, k).to(dtype)
            got = cpu_kernels.q8_linear(x, w.q, w.scale)
            ref = x.float() @ torch.from_numpy(want).t()
            assert got.dtype == torch.float32 and got.shape == (rows, n)
            # float32 sums in another order: within a few ulps of the largest terms
            assert torch.allclose(got, ref, rtol=1e-5, atol=4e-6 * float(ref.abs().max())), (got - ref).abs().max()
