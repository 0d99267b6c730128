"""The sampler: one token per logits row, each row with its own parameters.

Seeded sampling is stateless: the random draw for the token at position ``p`` of
a request with seed ``s`` comes from a generator seeded with ``(s, p)``. A token
therefore depends only on the request, never on what ran before on that worker:
a sequence recomputed after a preemption, a lost attention worker or a dense
worker's restart (or moved to another dense worker) samples exactly the tokens
it would have, with no generator state to carry or lose.
"""
from __future__ import annotations

import torch

from hetis.engine.sampling import SamplingParams


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k / nucleus top-p with -inf (one row)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = torch.sort(logits, descending=True)
        probs = sorted_l.softmax(-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.clone()
        logits[idx[drop]] = float("-inf")
    return logits


_MIX = 0x9E3779B97F4A7C15  # golden-ratio increment: spreads consecutive positions apart


def position_generator(seed: int, position: int) -> torch.Generator:
    """The (CPU) generator of the draw for the token at ``position`` of a request seeded
    ``seed``: CUDA generators give other streams, so seeded draws always happen on the CPU."""
    return torch.Generator().manual_seed((seed ^ (position * _MIX)) % (1 << 63))


def sample(logits: torch.Tensor, params: list[SamplingParams],
           positions: list[int]) -> list[int]:
    """One token per row of float32 ``logits`` [N, V]; row i samples position ``positions[i]``.

    A row is sampled from its own logits only: whatever one request asks for, another
    row's token cannot change or fail. Greedy rows (temperature < SAMPLING_EPS) take the
    argmax; a sampled row whose probabilities are not finite (cannot happen for accepted
    parameters and finite logits, but logits come from a model) falls back to it too.
    """
    out = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = _filter(logits[i] / p.temperature, p.top_k, p.top_p).softmax(-1)
        if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
            continue
        if p.seed is None:
            out[i] = int(torch.multinomial(probs, 1))
        else:  # drawn on the CPU whatever the device: the same seed gives the same token on a GPU
            gen = position_generator(p.seed, positions[i])
            out[i] = int(torch.multinomial(probs.cpu(), 1, generator=gen))
    return out
