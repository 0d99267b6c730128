"""The 8-bit KV cache (kv_cache_dtype="int8", hetis/model/kv_store.py): quantisation on
write (the fused kernel against the PyTorch reference, bit for bit), the paged decode
kernel over it against gather + SDPA over the same cache, its error against attention in
full precision, and migration's export/import."""
from __future__ import annotations

import random

import pytest
import torch

from hetis.model import cpu_kernels
from hetis.model.attention import AttentionBackend
from hetis.model.kv_store import KVStore, dequantize, quantize

from .test_cpu_kernels import _step, needs_compiler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows(dtype):
    torch.manual_seed(0)
    x = (torch.randn(40, 64) * torch.logspace(-3, 2, 40)[:, None]).to(dtype)
    x[7] = 0
    q, s = quantize(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s[7] == 0 and not q[7].any()
    assert q.abs().max(-1).values[s > 0].eq(127).all()       # each row's largest |x| -> 127
    err = (dequantize(q, s, torch.float32) - x.float()).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()         # half a step at most


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 600])   # 600 rows: the kernel's threaded branch
def test_fused_write_is_the_reference_bit_for_bit(dtype, n):
    torch.manual_seed(n)
    a = KVStore(2, 64, 16, 64, dtype, kv_cache_dtype="int8")
    assert a._fused, "a compiler is here: the fused write must be used"
    b = KVStore(2, 64, 16, 64, dtype, kv_cache_dtype="int8")
    b._fused = False
    slots = torch.randperm(64 * 16)[:n]
    k, v = (torch.randn(n, 64) * 3).to(dtype), torch.randn(n, 64).to(dtype)
    k[0] = 0
    for st in (a, b):
        st.write(1, slots, k, v)
    assert a.k.dtype == torch.int8 and a.k[1].any()
    for name in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("D,qpg", [(64, 3), (128, 4), (64, 5), (32, 2)])  # 5 and 32: the generic loop
def test_paged_kernel_matches_gather_and_sdpa_over_the_int8_cache(dtype, tol, D, qpg):
    rng = random.Random(D + qpg)
    torch.manual_seed(D * qpg)
    L, nb, bs = 2, 900, 16
    fast = AttentionBackend(L, nb, bs, D, qpg, dtype, kv_cache_dtype="int8")
    slow = AttentionBackend(L, nb, bs, D, qpg, dtype, paged=False, kv_cache_dtype="int8")
    assert fast.paged and not slow.paged
    fill = torch.arange(nb * bs)
    for layer in range(L):
        k, v = torch.randn(nb * bs, D).to(dtype), torch.randn(nb * bs, D).to(dtype)
        fast.store.write(layer, fill, k, v)
        slow.store.write(layer, fill, k, v)
    for prefill in (False, True):
        items = _step(rng, nb, bs, prefill)
        fast.begin_step(items)
        slow.begin_step(items)
        rows = sum(it.num_new for it in items)
        for layer in range(L):
            q = torch.randn(rows, qpg, D).to(dtype)
            k, v = torch.randn(rows, D).to(dtype), torch.randn(rows, D).to(dtype)
            a, b = fast.attend(layer, q, k, v), slow.attend(layer, q, k, v)
            assert a.dtype == dtype and a.shape == (rows, qpg, D)
            assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), (a.float() - b.float()).abs().max()
    for name in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(getattr(fast.store, name), getattr(slow.store, name)), name


@needs_compiler
def test_int8_attention_error_against_full_precision():
    """Decode attention over an int8 cache against the same keys and values in float32:
    the quantisation error (half a step of max|x| / 127 per element) moves the outputs by
    well under 2 % of their scale, on random heads of many context lengths."""
    rng = random.Random(0)
    torch.manual_seed(0)
    L, nb, bs, D, qpg = 1, 900, 16, 64, 3
    q8 = AttentionBackend(L, nb, bs, D, qpg, torch.float32, kv_cache_dtype="int8")
    ref = AttentionBackend(L, nb, bs, D, qpg, torch.float32)
    fill = torch.arange(nb * bs)
    k, v = torch.randn(nb * bs, D), torch.randn(nb * bs, D)
    q8.store.write(0, fill, k, v)
    ref.store.write(0, fill, k, v)
    items = _step(rng, nb, bs, prefill=False)
    q8.begin_step(items)
    ref.begin_step(items)
    rows = len(items)
    q = torch.randn(rows, qpg, D) * 2   # sharper softmaxes than unit queries give
    nk, nv = torch.randn(rows, D), torch.randn(rows, D)
    a, b = q8.attend(0, q, nk, nv), ref.attend(0, q, nk, nv)
    rel = float((a - b).abs().max() / b.abs().max())
    assert 0 < rel < 0.02, rel


def test_export_import_round_trip_keeps_the_int8_rows():
    torch.manual_seed(1)
    a = KVStore(3, 8, 4, 16, torch.bfloat16, kv_cache_dtype="int8")
    b = KVStore(3, 8, 4, 16, torch.bfloat16, kv_cache_dtype="int8")
    src, n = [5, 2, 7], 10
    slots = torch.tensor([bk * 4 + o for bk in src for o in range(4)][:n])
    for layer in range(3):
        a.write(layer, slots, torch.randn(n, 16).to(torch.bfloat16), torch.randn(n, 16).to(torch.bfloat16))
    k, v = a.export(src, n)
    assert k.dtype == torch.bfloat16 and k.shape == (3, n, 16)
    dst = [0, 1, 3]
    b.import_(dst, k, v)
    d_slots = torch.tensor([bk * 4 + o for bk in dst for o in range(4)][:n])
    assert torch.equal(a.k_flat[:, slots], b.k_flat[:, d_slots])
    assert torch.equal(a.v_flat[:, slots], b.v_flat[:, d_slots])
    assert torch.allclose(a.k_scale[:, slots], b.k_scale[:, d_slots], rtol=1e-2)
    assert a.token_bytes == 2 * (16 + 4) and KVStore(1, 1, 4, 16, torch.bfloat16).token_bytes == 64


def test_unknown_kv_cache_dtype_names_the_argument():
    with pytest.raises(ValueError, match="kv_cache_dtype: must be one of"):
        KVStore(1, 1, 4, 16, torch.float32, kv_cache_dtype="fp8")


def test_without_kernels_the_int8_cache_still_serves(monkeypatch):
    """HETIS_CPU_KERNELS=0 (or no compiler): the PyTorch write and gather + SDPA."""
    monkeypatch.setattr(cpu_kernels, "_libs", {"paged_decode": None, "fused_ops": None})
    be = AttentionBackend(1, 900, 16, 64, 3, torch.float32, kv_cache_dtype="int8")
    assert not be.paged and not be.store._fused
    rng = random.Random(3)
    items = _step(rng, 900, 16, prefill=False)[:5]
    be.begin_step(items)
    out = be.attend(0, torch.randn(5, 3, 64), torch.randn(5, 64), torch.randn(5, 64))
    assert out.shape == (5, 3, 64) and not out.isnan().any()


@needs_compiler
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_fused_write_refuses_slots_outside_the_cache(kv_cache_dtype):
    """The one-call writes check their slots as index_copy_ does: IndexError, nothing
    written past the cache."""
    st = KVStore(1, 4, 4, 8, torch.float32, kv_cache_dtype=kv_cache_dtype)
    assert st._fused
    for bad in (16, -1):
        with pytest.raises(IndexError, match="outside the cache"):
            st.write(0, torch.tensor([0, bad]), torch.ones(2, 8), torch.ones(2, 8))
    st.write(0, torch.tensor([15]), torch.full((1, 8), 2.0), torch.ones(1, 8))
    assert st.export([3], 4)[0][0, 3].eq(2.0).all()


@needs_compiler
def test_paged_decode_call_checks_its_rows():
    be = AttentionBackend(1, 900, 16, 64, 3, torch.float32)
    items = _step(random.Random(5), 900, 16, prefill=False)[:4]
    be.begin_step(items)
    call = be.layout.decodes[0].call
    assert call is not None
    with pytest.raises(ValueError, match="3 query rows for a step of 4 items"):
        call(0, torch.randn(3, 3, 64))


_GENERIC = """
import torch, sys
from hetis.model.attention import AttentionBackend
from hetis.engine.step import AttnItem
torch.manual_seed(0)
out = {}
for kv in ("auto", "int8"):
    be = AttentionBackend(1, 64, 16, 64, 3, torch.bfloat16, kv_cache_dtype=kv)
    fill = torch.arange(64 * 16)
    be.store.write(0, fill, torch.randn(64 * 16, 64).to(torch.bfloat16), torch.randn(64 * 16, 64).to(torch.bfloat16))
    items = [AttnItem(i, 0, n - 1, 1, list(range(4 * i, 4 * i + 4))) for i, n in enumerate((1, 17, 40, 64))]
    be.begin_step(items)
    q = torch.randn(4, 3, 64).to(torch.bfloat16)
    out[kv] = be.attend(0, q, torch.randn(4, 64).to(torch.bfloat16), torch.randn(4, 64).to(torch.bfloat16))
torch.save(out, sys.argv[1])
"""


@needs_compiler
def test_generic_loops_match_the_vector_ones(tmp_path):
    """HETIS_PAGED_GENERIC=1 (what CPUs without AVX-512 run, for either cache) against
    this CPU's default loops, on the same items: the same results to bf16 rounding."""
    import os
    import subprocess
    import sys
    outs = []
    for generic in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "HETIS_PAGED_GENERIC"}
        if generic:
            env["HETIS_PAGED_GENERIC"] = generic
        path = tmp_path / f"out-{generic}.pt"
        subprocess.run([sys.executable, "-c", _GENERIC, str(path)], env=env, check=True, timeout=120)
        outs.append(torch.load(path))
    for kv in ("auto", "int8"):
        a, b = outs[0][kv].float(), outs[1][kv].float()
        assert a.abs().max() > 0 and torch.allclose(a, b, atol=2e-2, rtol=2e-2), (kv, (a - b).abs().max())


@needs_compiler
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_fused_write_takes_strided_rows(kv_cache_dtype, monkeypatch):
    """An attention worker's k and v are column slices of one packed tensor: the one-call
    write serves them (no fallback) and stores what the fallback stores."""
    torch.manual_seed(2)
    packed = torch.randn(7, 3 * 64 + 2 * 64).to(torch.bfloat16)
    _, k, v = packed.split([3 * 64, 64, 64], dim=1)
    assert not k.is_contiguous() and k.stride(1) == 1
    slots = torch.tensor([5, 0, 33, 17, 2, 63, 40])
    a = KVStore(2, 4, 16, 64, torch.bfloat16, kv_cache_dtype=kv_cache_dtype)
    b = KVStore(2, 4, 16, 64, torch.bfloat16, kv_cache_dtype=kv_cache_dtype)
    b._fused = False
    calls = []
    fn = a._write
    monkeypatch.setattr(a, "_write", lambda *args: calls.append(1) or fn(*args))
    a.write(1, slots, k, v)
    b.write(1, slots, k.contiguous(), v.contiguous())
    assert calls == [1]
    for name in ("k", "v") + (("k_scale", "v_scale") if kv_cache_dtype == "int8" else ()):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@needs_compiler
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("D,h", [(64, 3), (32, 5)])   # a vector loop and the generic one
def test_an_item_with_no_context_gets_zeros(kv_cache_dtype, D, h):
    st = KVStore(1, 4, 16, D, torch.bfloat16, kv_cache_dtype=kv_cache_dtype)
    st.write(0, torch.arange(64), torch.randn(64, D).to(torch.bfloat16), torch.randn(64, D).to(torch.bfloat16))
    call = cpu_kernels.PagedDecode(st.layer_ptrs, torch.bfloat16, st.quantized, torch.tensor([[0], [1]]),
                                   torch.tensor([0, 5]), 16, D ** -0.5)
    out = call(0, torch.randn(2, h, D).to(torch.bfloat16))
    assert torch.equal(out[0], torch.zeros(h, D, dtype=torch.bfloat16)) and out[1].abs().sum() > 0
