"""The paged decode kernel (hetis/model/cpu_kernels.py) against gather + SDPA.

Both paths of AttentionBackend run the same random steps (decode items of many
context lengths over shuffled blocks, mixed with prefill chunks and with items
of other backends' rows left out) on copies of one cache; their outputs must
agree to the dtype's rounding, and the cache they leave must be identical.
"""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from hetis.engine.step import AttnItem
from hetis.model import cpu_kernels
from hetis.model.attention import AttentionBackend

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="no C++ compiler: the engine runs gather + SDPA")


def _step(rng: random.Random, num_blocks: int, bs: int, prefill: bool):
    """Random items: decodes of contexts 1..300 and, with ``prefill``, two prefill chunks
    (one from scratch, one over a cached history), on disjoint shuffled blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    items, seq = [], 0

    def take(ctx):
        return [free.pop() for _ in range(-(-ctx // bs))]
    for _ in range(rng.randint(20, 40)):
        ctx = rng.choice([1, 2, bs, bs + 1, rng.randint(1, 300)])
        for g in range(rng.randint(1, 3)):
            items.append(AttnItem(seq, g, ctx - 1, 1, take(ctx)))
        seq += 1
    if prefill:
        for start, new in ((0, 37), (50, 21)):  # a sequence's items stay consecutive
            at = rng.randrange(len(items) + 1)
            items[at:at] = [AttnItem(seq, g, start, new, take(start + new)) for g in range(2)]
            seq += 1
    return items


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("prefill", [False, True])
def test_kernel_matches_gather_and_sdpa(dtype, tol, prefill):
    assert cpu_kernels.library() is not None, "a compiler is here: the kernel must build"
    rng = random.Random(1)
    torch.manual_seed(0)
    L, nb, bs, D, qpg = 2, 900, 16, 64, 3
    fast = AttentionBackend(L, nb, bs, D, qpg, dtype)
    slow = AttentionBackend(L, nb, bs, D, qpg, dtype, paged=False)
    assert fast.paged and not slow.paged
    # bf16 prefill chunks: the kernel too, where a vector loop serves them (AVX-512 BF16)
    assert fast.paged_prefill == (dtype == torch.bfloat16 and cpu_kernels.paged_fast(D, qpg, dtype, False))
    fast.store.k.normal_(), fast.store.v.normal_()
    slow.store.k.copy_(fast.store.k), slow.store.v.copy_(fast.store.v)
    for _ in range(3):
        items = _step(rng, nb, bs, prefill)
        fast.begin_step(items)
        slow.begin_step(items)
        rows = sum(it.num_new for it in items)
        for layer in range(L):
            q = torch.randn(rows, qpg, D)
            k, v = torch.randn(rows, D), torch.randn(rows, D)
            a, b = fast.attend(layer, q, k, v), slow.attend(layer, q, k, v)
            assert a.dtype == dtype and a.shape == (rows, qpg, D)
            assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), \
                (a.float() - b.float()).abs().max()
        assert torch.equal(fast.store.k, slow.store.k) and torch.equal(fast.store.v, slow.store.v)


@needs_compiler
def test_kernel_call_reads_only_each_items_context():
    """Blocks past an item's context (and padding of its table row) hold NaNs: a kernel
    that read them would return NaNs."""
    bs, D, h = 4, 8, 2
    k = torch.full((10 * bs, D), float("nan"))
    v = torch.full((10 * bs, D), float("nan"))
    k[3 * bs:3 * bs + 3] = torch.randn(3, D)
    v[3 * bs:3 * bs + 3] = torch.randn(3, D)
    k[7 * bs:8 * bs] = torch.randn(bs, D)
    v[7 * bs:8 * bs] = torch.randn(bs, D)
    q = torch.randn(2, h, D)
    tables = torch.tensor([[3, 9], [7, 9]])  # 9: padding, never read
    out = cpu_kernels.paged_decode(k, v, q, tables, torch.tensor([3, 4]), bs, D ** -0.5)
    assert not out.isnan().any()
    ref = torch.softmax(q[0] @ k[3 * bs:3 * bs + 3].T * D ** -0.5, -1) @ v[3 * bs:3 * bs + 3]
    assert torch.allclose(out[0], ref, atol=1e-6)


def test_kernel_cache_key_names_the_cpu(monkeypatch, tmp_path):
    """The build is keyed by the CPU's flags: a cache shared with another kind of machine
    never hands this one code compiled for that one."""
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("HETIS_KERNEL_CACHE", str(tmp_path))
    a = cpu_kernels.build()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "sse2 another-cpu")
    b = cpu_kernels.build()
    assert a != b and a.exists() and b.exists()


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("h", [1, 3, 4, 5])     # 5: no bfloat16 loop of its own
@pytest.mark.parametrize("D", [32, 64, 128])     # 64 and 128 are compiled for their size
def test_kernel_head_dims(D, h, dtype, tol):
    """Contexts of 1 to 70 tokens over shuffled blocks: partial and whole blocks, and (the
    AVX-512 BF16 loop takes keys 16 at a time) partial and several chunks of 16."""
    torch.manual_seed(D * 10 + h)
    bs, n, per = 8, 7, 9
    k, v = torch.randn(n * per * bs, D).to(dtype), torch.randn(n * per * bs, D).to(dtype)
    tables = torch.randperm(n * per).view(n, per).contiguous()
    ctx = torch.tensor([1, 5, 8, 16, 17, 33, 70])
    q = torch.randn(n, h, D).to(dtype)
    out = cpu_kernels.paged_decode(k, v, q, tables, ctx, bs, D ** -0.5)
    assert out.dtype == dtype
    for i in range(n):
        slots = torch.cat([torch.arange(b * bs, (b + 1) * bs) for b in tables[i].tolist()])[:ctx[i]]
        kf, vf = k[slots].float(), v[slots].float()
        ref = torch.softmax(q[i].float() @ kf.T * D ** -0.5, -1) @ vf
        assert torch.allclose(out[i].float(), ref, atol=tol, rtol=tol), (i, (out[i].float() - ref).abs().max())


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 130])  # 130 rows: the kernels' threaded branch
def test_fused_ops_round_as_pytorch_does(dtype, T):
    """FusedOps against EagerOps (the model's PyTorch operations): RoPE with the q/k/v
    split and the residual add bit for bit; RMSNorm and SiLU x up to float32 rounding
    (another summation order, another expf), which bfloat16 results almost never see."""
    from hetis.model.dense import EagerOps, Rope
    assert cpu_kernels.supports(torch.empty(1, dtype=dtype), "fused_ops")
    fused, eager = cpu_kernels.FusedOps(dtype), EagerOps()
    torch.manual_seed(T)
    H, KV, D, hidden, inter = 9, 3, 64, 576, 1536
    tol = 2e-6 if dtype == torch.float32 else 0.0

    def close(a, b, rel):
        a, b = a.float(), b.float()
        return bool(((a - b).abs() <= rel * b.abs() + 1e-6).all())
    wide = torch.randn(T, hidden + 7, dtype=dtype) * 3   # rows with a stride, as slices come
    x, w = wide[:, :hidden], torch.randn(hidden, dtype=dtype)
    assert close(fused.rms_norm(x, w, 1e-5), eager.rms_norm(x, w, 1e-5), tol + 8e-3 * (tol == 0))
    h1, h2, a = x.clone(), x.clone(), torch.randn(T, hidden, dtype=dtype)
    n1, n2 = fused.add_rms_norm(h1, a, w, 1e-5), eager.add_rms_norm(h2, a, w, 1e-5)
    assert torch.equal(h1, h2)
    assert close(n1, n2, tol + 8e-3 * (tol == 0))
    rope = Rope(D, 10000.0, 8192, dtype)
    cos, sin = rope.tables(torch.randint(0, 8192, (T,)))
    qkv = torch.randn(T, (H + 2 * KV) * D, dtype=dtype)
    for got, want in zip(fused.rope_split(qkv, cos, sin, H, KV, D), eager.rope_split(qkv, cos, sin, H, KV, D)):
        assert got.shape == want.shape and torch.equal(got, want.contiguous())
    gu = torch.randn(T, 2 * inter, dtype=dtype) * 4
    s1, s2 = fused.silu_mul(gu), eager.silu_mul(gu)
    assert close(s1, s2, 2e-6 if dtype == torch.float32 else 1.6e-2)  # bf16: a flip, then the product
    if dtype == torch.bfloat16:
        assert (s1 != s2).float().mean() < 0.01
