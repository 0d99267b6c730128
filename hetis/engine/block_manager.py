"""Block accounting of a paged KV cache split along the head dimension.

A block holds ``block_size`` tokens of ONE KV-head group of one sequence, for
every layer. Block tables are keyed by (sequence, head group), so any subset of
a sequence's groups can live on a device, and capacity is counted in
tokens x groups.

Two halves, as in vLLM and TGI: ``BlockManager`` is the accounting (which
blocks belong to whom) and lives with the scheduler, in the router for the
mesh; ``KVStore`` (hetis/model/kv_store.py) is the storage (the tensors) and
lives with the attention backend. The scheduler tells the store which blocks to
use; the store never allocates.

Fencing: with several serving instances (hetis/engine/instance.py) steps run
while the engine's state changes (an abort, a lost device, another instance's
step). A block freed then may still be written by a step in flight, so it
must not be handed to anyone else before that step is over. The engine sets
``fence`` to the id of the newest step started while any step is in flight;
blocks freed under a fence wait in ``deferred`` until :meth:`release` is
called with a ``safe`` id above it (no step at or before the fence is still
running). With no step in flight (``hetis.LLM``) ``fence`` is None and a free
is immediate.
"""
from __future__ import annotations

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
        self.fence: int | None = None                  # see the module doc
        self.deferred: list[tuple[int, list[int]]] = []  # (fence, blocks) freed under a fence

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
            blocks = self.tables.pop(k)
            if self.fence is None:
                self.free_blocks.extend(reversed(blocks))
            else:
                self.deferred.append((self.fence, blocks))

    def release(self, safe: int | None) -> None:
        """Free the deferred blocks whose fence is below ``safe`` (None: all of them)."""
        if not self.deferred:
            return
        keep = []
        for fence, blocks in self.deferred:
            if safe is None or fence < safe:
                self.free_blocks.extend(reversed(blocks))
            else:
                keep.append((fence, blocks))
        self.deferred = keep

    def table(self, seq_id: int, group: int) -> list[int]:
        return self.tables[(seq_id, group)]

    def resident(self) -> dict[int, list[int]]:
        """sequence id -> sorted head groups held here."""
        out: dict[int, list[int]] = {}
        for s, g in self.tables:
            out.setdefault(s, []).append(g)
        return {s: sorted(gs) for s, gs in out.items()}
