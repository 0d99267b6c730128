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

from itertools import repeat

Key = tuple[int, int]  # (sequence id, head group)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SPLITS: dict[tuple[int, ...], dict[int, tuple[int, ...]]] = {}


def groups_by_device(placement) -> dict[int, tuple[int, ...]]:
    """device -> the head groups of ``placement`` on it (ascending), the devices in
    ascending order. Memoised by value (placements repeat: the dispatcher deals alike
    requests alike), so the answer is shared: do not change it."""
    key = tuple(placement)
    out = _SPLITS.get(key)
    if out is None:
        per: dict[int, list[int]] = {}
        for g, b in enumerate(key):
            per.setdefault(b, []).append(g)
        out = {b: tuple(per[b]) for b in sorted(per)}
        if len(_SPLITS) >= 1 << 15:  # a bound, not a policy: rebuilt on demand
            _SPLITS.clear()
        _SPLITS[key] = out
    return out


class BlockManager:
    """Block accounting for one device."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self.tables: dict[Key, list[int]] = {}
        # the same tables by sequence (group -> table, in the order ``tables`` has them):
        # a sequence's lookups and frees touch its own groups only
        self._by_seq: dict[int, dict[int, list[int]]] = {}
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
        tabs = self._by_seq.get(seq_id)
        if tabs is None:
            return want * len(groups)
        have = list(map(len, map(tabs.get, groups, repeat(()))))
        if not have:
            return 0
        if max(have) <= want:  # no table past the target: the sum of the shortfalls
            return want * len(have) - sum(have)
        return sum(want - n for n in have if n < want)

    def can_allocate(self, seq_id: int, groups, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, groups, num_tokens) <= len(self.free_blocks)

    def allocate(self, seq_id: int, groups, num_tokens: int) -> None:
        need = self.blocks_needed(seq_id, groups, num_tokens)
        if need > len(self.free_blocks):
            raise MemoryError(f"KV cache full: need {need} blocks, {len(self.free_blocks)} free")
        want = cdiv(num_tokens, self.block_size)
        if not need and want:  # every group already holds a table that long
            return
        free = self.free_blocks
        tabs = self._by_seq.setdefault(seq_id, {})
        for g in groups:
            table = tabs.get(g)
            if table is None:
                table = tabs[g] = self.tables[(seq_id, g)] = []
            k = want - len(table)
            if k > 0:  # as k pops: the last free block first
                taken = free[-k:]
                del free[-k:]
                taken.reverse()
                table += taken

    def free(self, seq_id: int, groups=None) -> None:
        """Free ``groups`` of a sequence (all of its groups when None)."""
        tabs = self._by_seq.get(seq_id)
        if not tabs:
            return
        keys = [g for g in tabs if groups is None or g in groups]
        for g in keys:
            blocks = tabs.pop(g)
            del self.tables[(seq_id, g)]
            if self.fence is None:
                self.free_blocks.extend(reversed(blocks))
            else:
                self.deferred.append((self.fence, blocks))
        if not tabs:
            del self._by_seq[seq_id]

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
