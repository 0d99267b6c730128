"""A request's state as it moves through the scheduler."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from hetis.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0          # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    placement: list[int] | None = None   # head group -> backend index
    text: str = ""                 # detokenised output (stop strings cut)
    num_preemptions: int = 0
    arrival: float = 0.0
    first_token_time: float | None = None
    moved_at: int = -(1 << 30)     # engine step id of its last head-group move (re-dispatch)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the two lists."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
