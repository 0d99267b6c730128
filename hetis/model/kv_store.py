"""KV storage of one device: K and V tensors addressed by (block, offset), for every layer.

A block holds ``block_size`` tokens of one KV-head group of one sequence; which
blocks belong to whom is the scheduler's business (hetis/engine/block_manager.py).
"""
from __future__ import annotations

import math
import mmap

import torch


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


class KVStore:
    """The K and V tensors of one device: [layers, blocks, block_size, head_dim] each."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (num_layers, num_blocks, block_size, head_dim)
        self.k = _lazy_zeros(shape, dtype, device)
        self.v = _lazy_zeros(shape, dtype, device)
        self.block_size = block_size
        self.k_flat = self.k.view(num_layers, num_blocks * block_size, head_dim)
        self.v_flat = self.v.view(num_layers, num_blocks * block_size, head_dim)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values ([N, D]) at flat slot indices ([N])."""
        self.k_flat[layer].index_copy_(0, slots, k)
        self.v_flat[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, tables: torch.Tensor, out: tuple | None = None):
        """K, V for block tables [N, B] -> [N, B * block_size, D] each.

        ``out`` (two tensors of that shape) avoids allocating, and page-faulting,
        fresh multi-MB buffers on every layer.
        """
        n, b = tables.shape
        idx = tables.reshape(-1)
        blocks = (n * b, self.block_size, self.k.shape[-1])
        if out is None:
            k = self.k[layer].index_select(0, idx)
            v = self.v[layer].index_select(0, idx)
        else:
            k = torch.index_select(self.k[layer], 0, idx, out=out[0].view(blocks))
            v = torch.index_select(self.v[layer], 0, idx, out=out[1].view(blocks))
        return k.view(n, b * self.block_size, -1), v.view(n, b * self.block_size, -1)

    def export(self, blocks: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One (sequence, group)'s cache as dense [layers, num_tokens, D] tensors."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        L = self.k.shape[0]
        k = self.k[:, idx].reshape(L, -1, self.k.shape[-1])[:, :num_tokens]
        v = self.v[:, idx].reshape(L, -1, self.v.shape[-1])[:, :num_tokens]
        return k.clone(), v.clone()

    def import_(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write an exported slice into ``blocks`` (the inverse of :meth:`export`)."""
        n = k.shape[1]
        if len(blocks) * self.block_size < n:
            raise ValueError(f"{len(blocks)} blocks cannot hold {n} tokens")
        slots = torch.cat([torch.arange(b * self.block_size, (b + 1) * self.block_size)
                           for b in blocks])[:n].to(self.k.device)
        self.k_flat[:, slots] = k.to(self.k.dtype)
        self.v_flat[:, slots] = v.to(self.v.dtype)
