"""The attention half of the seam: a backend that computes attention for any
subset of KV-head groups of any rows of the batch, over its own paged KV cache.

The step's work for one backend is a list of ``AttnItem`` — (sequence, head
group, cached tokens, new tokens, block table). Per layer the backend gets the
packed q/k/v of those items (item-major: all new tokens of item 0, then item
1, ...), appends k/v to its cache and returns the attention output in the same
packed order. The layout is turned into index tensors once per step
(``begin_step``), never per layer.

Decode items (one new token) are batched: with GQA the q-heads of a group are
just ``q_per_group`` query rows against one KV head. On the CPU a whole decode
batch is one call of the paged decode kernel (hetis/model/cpu_kernels.py),
which reads the keys and values in place through the block tables. Elsewhere
(or without a compiler) it is one scaled-dot-product call per bucket of
similar context lengths, over keys gathered from the block tables and masked
by context length. Prefill chunks go one sequence at a time (all of its groups
here in one call): they are long enough to amortise the gather and the call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hetis.engine.block_manager import cdiv
from hetis.engine.step import AttnItem
from hetis.model import cpu_kernels
from hetis.model.kv_store import KVStore


@dataclass
class _Prefill:
    rows: slice          # packed rows of this sequence's items (all its groups here)
    groups: int
    start: int
    num_new: int
    tables: torch.Tensor  # [groups, blocks]


@dataclass
class _Decode:
    """Decode items: all of them for the paged kernel (``ctx`` set), else a bucket of
    items of similar context length, padded to its longest (``mask`` set)."""
    rows: torch.Tensor | None   # packed rows (None: all rows, in order)
    tables: torch.Tensor        # [Nd, B]
    mask: torch.Tensor | None   # [Nd, 1, 1, B * block_size] True where attended
    buf: tuple | None = None    # preallocated gather outputs, reused by every layer
    ctx: torch.Tensor | None = None  # [Nd] tokens attended (paged kernel)
    call: cpu_kernels.PagedDecode | None = None  # the paged kernel's call, prepared once a step


@dataclass
class StepLayout:
    """Index tensors for one step on one backend, derived from its items."""
    num_rows: int
    slots: torch.Tensor                    # [P] flat cache slot of each packed row
    decodes: list[_Decode] = field(default_factory=list)
    prefills: list[_Prefill] = field(default_factory=list)

    MAX_BUCKETS = 4  # decode items sorted by context and split so padding stays small

    @classmethod
    def build(cls, items: list[AttnItem], block_size: int, device="cpu",
              paged: bool = False, paged_prefill: bool = False) -> "StepLayout":
        """``paged``: the decode items go to the paged kernel in one batch (no buckets,
        no padding, no mask). ``paged_prefill`` (with ``paged``): every packed row does,
        a prefill chunk's token being one query over its own prefix of the cache."""
        if not items:
            return cls(0, torch.empty(0, dtype=torch.long))
        n_new = torch.tensor([it.num_new for it in items])
        starts = torch.tensor([it.start for it in items])
        width = max(len(it.blocks) for it in items)
        tables = torch.tensor([it.blocks + [0] * (width - len(it.blocks)) for it in items])
        item_of_row = torch.repeat_interleave(torch.arange(len(items)), n_new)
        row_base = torch.cumsum(n_new, 0) - n_new
        pos = starts[item_of_row] + torch.arange(int(n_new.sum())) - row_base[item_of_row]
        slots = tables[item_of_row, pos // block_size] * block_size + pos % block_size
        lay = cls(int(n_new.sum()), slots.to(device))
        if paged and paged_prefill:
            lay.decodes.append(_Decode(None, tables[item_of_row].to(device), None, ctx=(pos + 1).to(device)))
            return lay
        dec = (n_new == 1).nonzero().flatten()
        if len(dec) and paged:
            lay.decodes.append(_Decode(None if len(dec) == len(items) else row_base[dec].to(device),
                                       tables[dec].to(device), None, ctx=(starts[dec] + 1).to(device)))
        elif len(dec):
            ctx = starts[dec] + 1
            nbuckets = min(cls.MAX_BUCKETS, cdiv(len(dec), 16))
            if nbuckets > 1:
                order = torch.argsort(ctx)
                dec, ctx = dec[order], ctx[order]
            for part, c in zip(torch.tensor_split(dec, nbuckets), torch.tensor_split(ctx, nbuckets)):
                nb = cdiv(int(c.max()), block_size)
                keep = torch.arange(nb * block_size)[None, :] < c[:, None]
                whole = nbuckets == 1 and len(dec) == len(items)
                lay.decodes.append(_Decode(None if whole else row_base[part].to(device),
                                           tables[part, :nb].to(device),
                                           keep[:, None, None, :].to(device)))
        # prefill chunks, grouped by sequence (consecutive items of one sequence)
        i = 0
        while i < len(items):
            it = items[i]
            if it.num_new == 1:
                i += 1
                continue
            j = i
            while j < len(items) and items[j].seq_id == it.seq_id:
                j += 1
            nb = cdiv(it.start + it.num_new, block_size)
            r0 = int(row_base[i])
            lay.prefills.append(_Prefill(slice(r0, r0 + (j - i) * it.num_new), j - i, it.start,
                                         it.num_new, tables[i:j, :nb].to(device)))
            i = j
        return lay


class AttentionBackend:
    """Local attention over a KVStore (a device's share of the head groups)."""

    remote = False

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, head_dim: int,
                 q_per_group: int, dtype: torch.dtype, device: str = "cpu",
                 store: KVStore | None = None, paged: bool | None = None,
                 kv_cache_dtype: str = "auto"):
        # ``store``: share another backend's cache (an attention worker's channels do; the
        # router's block accounting keeps them on disjoint blocks). ``paged``: decode with
        # the paged kernel (default: wherever it serves this cache; False: gather + SDPA).
        # ``kv_cache_dtype``: "auto" (the cache in ``dtype``) or "int8" (kv_store.py)
        self.store = store or KVStore(num_layers, num_blocks, block_size, head_dim, dtype, device,
                                      kv_cache_dtype)
        self.block_size, self.qpg, self.head_dim = block_size, q_per_group, head_dim
        self.device = device
        self.layout = StepLayout(0, torch.empty(0, dtype=torch.long))
        self.paged = cpu_kernels.supports(self.store.k, dtype=self.store.dtype) if paged is None else paged
        # prefill chunks through the paged kernel too, one query token at a time over its
        # prefix, where a vector loop serves the shape (bf16: PyTorch's flash SDPA converts
        # to float32 for MKL's sgemm, and this is faster; the generic loop is not; docs/cpu.md).
        # Float32 keeps PyTorch's SDPA, the reference.
        self.paged_prefill = self.paged and self.store.dtype == torch.bfloat16 and cpu_kernels.paged_fast(
            head_dim, q_per_group, self.store.dtype, self.store.quantized)
        self.scale = head_dim ** -0.5

    def begin_step(self, items: list[AttnItem]) -> None:
        self.layout = lay = StepLayout.build(items, self.block_size, self.device, self.paged,
                                             self.paged_prefill)
        st = self.store
        dt, dev = st.dtype, st.k.device
        for d in lay.decodes:
            if d.ctx is not None:
                d.call = cpu_kernels.PagedDecode(st.layer_ptrs, dt, st.quantized, d.tables, d.ctx,
                                                 self.block_size, self.scale)
                continue
            n, b = d.tables.shape
            shape = (n, b * self.block_size, self.head_dim)
            d.buf = (torch.empty(shape, dtype=dt, device=dev), torch.empty(shape, dtype=dt, device=dev))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [P, qpg, D], k and v [P, D] -> attention output [P, qpg, D], in the store's dtype."""
        lay, st = self.layout, self.store
        dt = st.dtype
        if q.dtype != dt or k.dtype != dt or v.dtype != dt:
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        st.write(layer, lay.slots, k, v)
        # one decode batch of every row (a pure decode step): its output is the output
        out = None if len(lay.decodes) == 1 and lay.decodes[0].rows is None else torch.empty_like(q)
        for d in lay.decodes:
            qd = q if d.rows is None else q[d.rows]
            if d.call is not None:
                o = d.call(layer, qd)
            else:
                kc, vc = st.gather(layer, d.tables, d.buf)
                o = F.scaled_dot_product_attention(qd.unsqueeze(1), kc.unsqueeze(1), vc.unsqueeze(1),
                                                   attn_mask=d.mask).squeeze(1)
            if d.rows is None:
                out = o
            else:
                out[d.rows] = o
        for p in lay.prefills:
            ctx = p.start + p.num_new
            qp = q[p.rows].view(p.groups, p.num_new, self.qpg, -1).transpose(1, 2)
            if p.start == 0:  # the whole context is this chunk: its own keys, not the cache's copy
                kc = k[p.rows].reshape(p.groups, 1, p.num_new, -1)
                vc = v[p.rows].reshape(p.groups, 1, p.num_new, -1)
            else:
                kc, vc = st.gather(layer, p.tables)
                kc, vc = kc[:, None, :ctx], vc[:, None, :ctx]
            if p.start == 0:
                o = F.scaled_dot_product_attention(qp, kc, vc, is_causal=True, enable_gqa=True)
            else:
                mask = (torch.arange(ctx, device=q.device)[None, :]
                        <= (p.start + torch.arange(p.num_new, device=q.device))[:, None])
                o = F.scaled_dot_product_attention(qp, kc, vc, attn_mask=mask, enable_gqa=True)
            out[p.rows] = o.transpose(1, 2).reshape(-1, self.qpg, self.head_dim)
        return out


def profile_attention(backend: "AttentionBackend", num_items: int = 12,
                      contexts: tuple[int, int] = (32, 512), repeats: int = 3) -> tuple[float, float]:
    """Measure (seconds per token x group read, seconds per group) of one decode layer.

    Runs decode attention over ``num_items`` synthetic (sequence, group) items at
    two context lengths on ``backend`` and solves t = a * tokens + b * groups.
    This is the dispatcher's starting cost model; workers refine it from the steps
    they run. A cache too small to hold the synthetic items (a memory-poor device,
    ``--kv-tokens`` of a few hundred) is profiled on a scratch one-layer backend
    of the same shape on the same device: the cost per token read does not depend
    on how many blocks the cache has.
    """
    import time as _time
    bs = backend.block_size
    D, qpg = backend.head_dim, backend.qpg
    dtype = backend.store.dtype
    nblk = backend.store.k.shape[1]
    need = cdiv(max(contexts), bs) * num_items
    if need > nblk:
        backend = AttentionBackend(1, need, bs, D, qpg, dtype, backend.device,
                                   kv_cache_dtype=backend.store.kv_cache_dtype)
    times = []
    for ctx in contexts:
        per = cdiv(ctx, bs)
        items = [AttnItem(10 ** 9 + i, 0, ctx - 1, 1, list(range(i * per, (i + 1) * per)))
                 for i in range(num_items)]
        backend.begin_step(items)
        q = torch.randn(num_items, qpg, D, dtype=dtype, device=backend.device)
        kv = torch.randn(num_items, D, dtype=dtype, device=backend.device)
        best = float("inf")
        for _ in range(repeats):
            t0 = _time.perf_counter()
            backend.attend(0, q, kv, kv)
            best = min(best, _time.perf_counter() - t0)
        times.append(best)
    t1, t2 = times
    a = max((t2 - t1) / (num_items * (contexts[1] - contexts[0])), 1e-12)
    b = max((t1 - a * num_items * contexts[0]) / num_items, 1e-9)
    return a, b
