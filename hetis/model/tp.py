"""Tensor parallelism for the dense model, gpt-fast style: shard the loaded weights in place.

Rank r of K keeps the head groups ``group_split(G, K)[r]`` (contiguous, as even
as possible; K may not divide G: SmolLM2 has 3 groups) and a slice of the MLP:

- QKV, column-wise: the q heads of its groups and their k and v heads;
- O, row-wise: the input columns of those q heads;
- gate and up, column-wise: its slice of the intermediate size;
- down, row-wise: the same slice of its input columns.

The O projection and the MLP then give partial sums, which :func:`shard` wraps
with an all-reduce (the model's ``o_proj`` and ``mlp`` seams), so every rank
holds the whole hidden state after each; embeddings, norms and the LM head
stay whole (every rank computes the same logits). The model code does not
learn about TP: its config is replaced by the rank's (fewer heads, a smaller
intermediate size) and its own code runs unchanged. A rank computes q/k/v for
its own groups only, so the attention of those groups (its own KV, or an
attention worker's) is its business (``Executor(groups=...)``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from hetis.model.dense import DenseModel


def group_split(num_groups: int, world: int) -> list[range]:
    """Contiguous shares of ``num_groups`` head groups over ``world`` ranks."""
    if not 1 <= world <= num_groups:
        raise ValueError(f"tp: must be between 1 and the model's {num_groups} KV-head groups "
                         f"(got {world})")
    base, extra = divmod(num_groups, world)
    out, start = [], 0
    for r in range(world):
        n = base + (r < extra)
        out.append(range(start, start + n))
        start += n
    return out


def even_slice(size: int, world: int, rank: int) -> slice:
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def shard(model: DenseModel, rank: int, world: int,
          all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> range:
    """Shard ``model`` in place for ``rank`` of ``world``; returns the head groups it keeps.
    ``all_reduce(t)`` sums ``t`` over the ranks (in place) and returns it."""
    c = model.cfg
    if not isinstance(model.layers[0]["qkv"], torch.Tensor):
        raise ValueError("weights: 'gguf' (int4) weights are not sharded for tensor parallelism; "
                         "use --weights dense with --tp")
    groups = group_split(c.num_groups, world)[rank]
    qpg, D = c.q_per_group, c.head_dim
    q_rows = slice(groups.start * qpg * D, groups.stop * qpg * D)
    kv_rows = slice(groups.start * D, groups.stop * D)
    i_rows = even_slice(c.intermediate_size, world, rank)
    for L in model.layers:
        q, k, v = L["qkv"].split([model.q_size, model.kv_size, model.kv_size])
        L["qkv"] = torch.cat([q[q_rows], k[kv_rows], v[kv_rows]]).contiguous()
        L["o"] = L["o"][:, q_rows].contiguous()
        gate, up = L["gate_up"].chunk(2)
        L["gate_up"] = torch.cat([gate[i_rows], up[i_rows]]).contiguous()
        L["down"] = L["down"][:, i_rows].contiguous()
    model.cfg = replace(c, num_heads=len(groups) * qpg, num_kv_heads=len(groups),
                        intermediate_size=i_rows.stop - i_rows.start)
    model.q_size, model.kv_size = len(groups) * qpg * D, len(groups) * D
    o_proj, mlp = model.o_proj, model.mlp
    model.o_proj = lambda layer, attn: all_reduce(o_proj(layer, attn))
    model.mlp = lambda layer, x: all_reduce(mlp(layer, x))
    return groups
