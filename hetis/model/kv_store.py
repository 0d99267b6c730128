"""KV storage of one device: K and V tensors addressed by (block, offset), for every layer.

A block holds ``block_size`` tokens of one KV-head group of one sequence; which
blocks belong to whom is the scheduler's business (hetis/engine/block_manager.py).

``kv_cache_dtype="int8"`` stores every key and value row (one token of one head group)
as int8 with one float32 scale, max|x| / 127, beside it: 1 + 4 / head_dim bytes an
element instead of bfloat16's 2, so decode attention, which on a CPU is bound by the
bytes it reads (docs/cpu.md), reads about half as many. Rows are quantised as they are
written and widened where they are read: by the paged decode kernel in place, by
``gather`` (prefill, the PyTorch fallback) and ``export`` (migration) into the compute
dtype. Accuracy: docs/cpu.md ("8-bit KV cache").
"""
from __future__ import annotations

import math
import mmap

import torch

from hetis.defaults import KV_CACHE_DTYPES
from hetis.model import cpu_kernels


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [N, D] -> int8 round(x * 127 / max|x|) [N, D] and s = max|x| / 127 [N] (float32);
    a row of zeros gets s = 0. The reference for fused_ops' kv_write_q8, which matches it
    bit for bit (hence a product by 127 / max, rounded once, rather than x / s)."""
    xf = x.float()
    m = xf.abs().amax(-1)
    s = m * (1 / 127)
    inv = torch.where(m > 0, torch.tensor(127.0).div(m), 0.0)
    q = (xf * inv[:, None]).round().clamp_(-127, 127)
    return q.to(torch.int8), s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows [..., D] with scales [...] -> ``dtype`` rows (widened in float32)."""
    return (q.float() * s[..., None]).to(dtype)


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros whose memory is committed only where written (CPU: anonymous mmap).

    A KV cache is sized for the worst case; ``torch.zeros`` would touch (and
    keep resident) every page of it at start. Anonymous mappings are
    zero-filled by the kernel and paged in on first write.
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    buf = mmap.mmap(-1, max(1, n * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(buf, dtype=dtype, count=n).view(shape)


def check_kv_cache_dtype(name: str) -> str:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: must be one of {KV_CACHE_DTYPES} (got {name!r})")
    return name


class KVStore:
    """The K and V tensors of one device: [layers, blocks, block_size, head_dim] each.

    ``dtype`` is what attention computes in (and what ``gather``/``export`` return);
    ``kv_cache_dtype`` "auto" stores that dtype, "int8" stores int8 rows with float32
    scales ``k_scale``/``v_scale`` [layers, blocks * block_size] (module docstring)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu", kv_cache_dtype: str = "auto"):
        self.quantized = check_kv_cache_dtype(kv_cache_dtype) == "int8"
        self.kv_cache_dtype, self.dtype = kv_cache_dtype, dtype
        shape = (num_layers, num_blocks, block_size, head_dim)
        stored = torch.int8 if self.quantized else dtype
        self.k = _lazy_zeros(shape, stored, device)
        self.v = _lazy_zeros(shape, stored, device)
        self.block_size = block_size
        self.k_flat = self.k.view(num_layers, num_blocks * block_size, head_dim)
        self.v_flat = self.v.view(num_layers, num_blocks * block_size, head_dim)
        if self.quantized:
            self.k_scale = _lazy_zeros((num_layers, num_blocks * block_size), torch.float32, device)
            self.v_scale = _lazy_zeros((num_layers, num_blocks * block_size), torch.float32, device)
        # the write in one call (CPU kernels); else index_copy_ / the PyTorch quantiser
        self._fused = cpu_kernels.supports(self.k, "fused_ops", dtype)
        if self._fused:
            self._write = cpu_kernels.function("fused_ops", "hetis_kv_write_q8" if self.quantized
                                               else "hetis_kv_write", dtype)
        parts = (self.k_flat, self.v_flat) + ((self.k_scale, self.v_scale) if self.quantized else ())
        # every layer's cache pointers, taken once (the kernels' arguments)
        self.layer_ptrs = [tuple(t[layer].data_ptr() for t in parts) for layer in range(num_layers)]

    @property
    def token_bytes(self) -> float:
        """Bytes a cached token of one head group takes in one layer (K and V)."""
        d = self.k.shape[-1]
        return 2 * (d + 4) if self.quantized else 2 * d * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values ([N, D], in ``dtype``) at flat slot indices ([N])."""
        d = self.k.shape[-1]
        if self._fused and k.dtype == v.dtype == self.dtype and slots.dtype == torch.int64 \
                and k.dim() == v.dim() == 2 and k.shape[1] == v.shape[1] == d \
                and k.stride(1) == v.stride(1) == 1 and slots.is_contiguous() \
                and k.shape[0] == v.shape[0] == slots.shape[0]:
            # rows may be strided (an attention worker's k and v are views of one packed
            # tensor); the kernels take each one's row stride
            n = k.shape[0]
            cap = self.k_flat.shape[1]
            args = (k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(),
                    *self.layer_ptrs[layer], n, d, cap)
            bad = self._write(*args, torch.get_num_threads()) if self.quantized else self._write(*args)
            if bad:   # those rows were not written (fused_ops.cpp)
                raise IndexError(f"KV write: {bad} slots outside the cache's {cap}")
        elif not self.quantized:
            self.k_flat[layer].index_copy_(0, slots, k)
            self.v_flat[layer].index_copy_(0, slots, v)
        else:
            for x, q, s in ((k, self.k_flat, self.k_scale), (v, self.v_flat, self.v_scale)):
                xq, xs = quantize(x)
                q[layer].index_copy_(0, slots, xq)
                s[layer].index_copy_(0, slots, xs)

    def gather(self, layer: int, tables: torch.Tensor, out: tuple | None = None):
        """K, V for block tables [N, B] -> [N, B * block_size, D] each.

        ``out`` (two tensors of that shape) avoids allocating, and page-faulting,
        fresh multi-MB buffers on every layer.
        """
        n, b = tables.shape
        idx = tables.reshape(-1)
        blocks = (n * b, self.block_size, self.k.shape[-1])
        if self.quantized:
            bs = self.block_size
            ks = self.k_scale[layer].view(-1, bs).index_select(0, idx)
            vs = self.v_scale[layer].view(-1, bs).index_select(0, idx)
            k = dequantize(self.k[layer].index_select(0, idx), ks, self.dtype)
            v = dequantize(self.v[layer].index_select(0, idx), vs, self.dtype)
            if out is not None:
                k, v = out[0].view(blocks).copy_(k), out[1].view(blocks).copy_(v)
        elif out is None:
            k = self.k[layer].index_select(0, idx)
            v = self.v[layer].index_select(0, idx)
        else:
            k = torch.index_select(self.k[layer], 0, idx, out=out[0].view(blocks))
            v = torch.index_select(self.v[layer], 0, idx, out=out[1].view(blocks))
        return k.view(n, b * self.block_size, -1), v.view(n, b * self.block_size, -1)

    def export(self, blocks: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One (sequence, group)'s cache as dense [layers, num_tokens, D] tensors (in
        ``dtype``: an 8-bit cache's rows widened, and quantised again by ``import_``, which
        gives back the same int8 rows, and the scales to the dtype's rounding of 127 * s)."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        L = self.k.shape[0]
        k = self.k[:, idx].reshape(L, -1, self.k.shape[-1])[:, :num_tokens]
        v = self.v[:, idx].reshape(L, -1, self.v.shape[-1])[:, :num_tokens]
        if self.quantized:
            bs = self.block_size
            ks = self.k_scale.view(L, -1, bs)[:, idx].reshape(L, -1)[:, :num_tokens]
            vs = self.v_scale.view(L, -1, bs)[:, idx].reshape(L, -1)[:, :num_tokens]
            return dequantize(k, ks, self.dtype), dequantize(v, vs, self.dtype)
        return k.clone(), v.clone()

    def import_(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write an exported slice into ``blocks`` (the inverse of :meth:`export`)."""
        n = k.shape[1]
        if len(blocks) * self.block_size < n:
            raise ValueError(f"{len(blocks)} blocks cannot hold {n} tokens")
        slots = torch.cat([torch.arange(b * self.block_size, (b + 1) * self.block_size)
                           for b in blocks])[:n].to(self.k.device)
        if self.quantized:
            for x, q, s in ((k, self.k_flat, self.k_scale), (v, self.v_flat, self.v_scale)):
                xq, xs = quantize(x.reshape(-1, x.shape[-1]))
                q[:, slots] = xq.view(x.shape)
                s[:, slots] = xs.view(x.shape[:-1])
            return
        self.k_flat[:, slots] = k.to(self.k.dtype)
        self.v_flat[:, slots] = v.to(self.v.dtype)
