"""Paged KV cache split along the head dimension.

A block holds ``block_size`` tokens of ONE KV-head group of one sequence, for
every layer. Block tables are keyed by (sequence, head group), so any subset of
a sequence's groups can live on a device, and capacity is counted in
tokens x groups.

Two halves, as in vLLM and TGI: ``BlockManager`` is the accounting (which
blocks belong to whom) and lives with the scheduler, in the router for the
mesh; ``KVStore`` is the storage (the tensors) and lives with the attention
backend. The scheduler tells the store which blocks to use; the store never
allocates.
"""
from __future__ import annotations

import math
import mmap

import torch

Key = tuple[int, int]  # (sequence id, head group)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Block accounting for one device."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self.tables: dict[Key, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        """Capacity in tokens x groups."""
        return self.num_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        return len(self.free_blocks) * self.block_size

    @property
    def used_tokens(self) -> int:
        return self.capacity_tokens - self.free_tokens

    def blocks_needed(self, seq_id: int, groups, num_tokens: int) -> int:
        """Blocks to add so each of ``groups`` of ``seq_id`` holds ``num_tokens`` tokens."""
        want = cdiv(num_tokens, self.block_size)
        return sum(max(0, want - len(self.tables.get((seq_id, g), ()))) for g in groups)

    def can_allocate(self, seq_id: int, groups, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, groups, num_tokens) <= len(self.free_blocks)

    def allocate(self, seq_id: int, groups, num_tokens: int) -> None:
        need = self.blocks_needed(seq_id, groups, num_tokens)
        if need > len(self.free_blocks):
            raise MemoryError(f"KV cache full: need {need} blocks, {len(self.free_blocks)} free")
        want = cdiv(num_tokens, self.block_size)
        for g in groups:
            table = self.tables.setdefault((seq_id, g), [])
            while len(table) < want:
                table.append(self.free_blocks.pop())

    def free(self, seq_id: int, groups=None) -> None:
        """Free ``groups`` of a sequence (all of its groups when None)."""
        keys = [k for k in self.tables if k[0] == seq_id and (groups is None or k[1] in groups)]
        for k in keys:
            self.free_blocks.extend(reversed(self.tables.pop(k)))

    def table(self, seq_id: int, group: int) -> list[int]:
        return self.tables[(seq_id, group)]

    def resident(self) -> dict[int, list[int]]:
        """sequence id -> sorted head groups held here."""
        out: dict[int, list[int]] = {}
        for s, g in self.tables:
            out.setdefault(s, []).append(g)
        return {s: sorted(gs) for s, gs in out.items()}


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
