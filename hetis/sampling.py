"""Sampling parameters and the sampler."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first sampling, so `import hetis` (the CLI, the SDK) stays light
    import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (vLLM's names and defaults).

    ``temperature=0`` is greedy. ``top_k=-1`` and ``top_p=1`` disable those
    filters. ``seed`` makes a request's sampling reproducible whatever else is
    in the batch. Stop strings are not included in the returned text.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0 \
                or self.temperature != self.temperature:
            bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) \
                or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", "must be -1 (off) or an integer >= 1")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2 ** 63):
            bad("seed", "must be None or an integer in [0, 2**63)")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            bad("stop", "must be a string or a list of non-empty strings")
        self.stop_list = stop
        ids = self.stop_token_ids or []
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
            bad("stop_token_ids", "must be a list of non-negative integers")
        self.stop_token_ids = list(ids)
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _filter(logits: "torch.Tensor", top_k: int, top_p: float) -> "torch.Tensor":
    """Mask logits outside top-k / nucleus top-p with -inf (one row)."""
    import torch
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


def sample(logits: "torch.Tensor", params: list[SamplingParams],
           generators: list["torch.Generator | None"]) -> list[int]:
    """One token per row of float32 ``logits`` [N, V]."""
    import torch
    out = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out
