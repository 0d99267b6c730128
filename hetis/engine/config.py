"""The engine's knobs (a plain dataclass passed whole, as nano-vllm's Config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Scheduler and KV-cache knobs shared by `hetis.LLM` and the mesh router.

    ``kv_tokens`` is the KV capacity of each attention backend in tokens x head
    groups (one token of one KV-head group, all layers). None sizes it for
    ``max_num_seqs`` sequences of ``max_model_len`` tokens with every group.

    Re-dispatch (hetis/engine/redispatch.py, the paper's section 5.3):
    ``kv_headroom`` None reserves each request's whole expected KV (prompt +
    max_tokens) at admission; an integer reserves what it holds now plus that
    many tokens per head group, and a device that runs short later is relieved
    by moving head groups (``kv_balance``) or, with the whole cluster full, by
    preemption. ``rebalance_threshold`` (Theta) moves a request off the slowest
    device when the predicted attention makespan exceeds (1 + Theta) times the
    ideal one; 0 turns that off. ``max_move_tokens`` bounds the KV one step
    carries (tokens x groups; at least one group always goes), which bounds
    the stall a step takes for migration; ``move_cooldown`` is how many steps a
    moved request stays where it was put (no ping-pong).
    """
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int = 2048
    kv_tokens: int | None = None
    # test-only: every N steps of an instance, move one head group of a running sequence
    # to another device (live migration exercised without a policy); 0: never
    migrate_every: int = 0
    kv_headroom: int | None = None
    kv_balance: bool = True
    rebalance_threshold: float = 0.5
    max_move_tokens: int = 4096
    move_cooldown: int = 16
