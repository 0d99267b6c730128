"""The engine's knobs (a plain dataclass passed whole, as nano-vllm's Config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Scheduler and KV-cache knobs shared by `hetis.LLM` and the mesh router.

    ``kv_tokens`` is the KV capacity of each attention backend in tokens x head
    groups (one token of one KV-head group, all layers). None sizes it for
    ``max_num_seqs`` sequences of ``max_model_len`` tokens with every group.
    """
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int = 2048
    kv_tokens: int | None = None
    # test-only: every N steps of an instance, move one head group of a running sequence
    # to another device (live migration exercised without a policy); 0: never
    migrate_every: int = 0
