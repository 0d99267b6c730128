"""The engine: scheduler + executor + sampling + detokenisation and stops.

One object, two compositions: ``hetis.LLM`` builds it with in-process
attention backends; the mesh router builds it with remote ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from hetis.config import EngineConfig
from hetis.executor import Executor, StepChunk
from hetis.kv_cache import BlockManager
from hetis.sampling import SamplingParams
from hetis.scheduler import Scheduler
from hetis.sequence import Sequence
from hetis.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class StepOutput:
    """What a step produced for one sequence (streaming unit)."""
    seq: Sequence
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    time: float = field(default_factory=time.monotonic)  # when the step produced it


class Engine:
    def __init__(self, executor: Executor, tokenizer: Tokenizer, managers: list[BlockManager],
                 cfg: EngineConfig, place: Callable[[Sequence], list[int] | None],
                 eos_token_ids: tuple[int, ...] = (), vocab_size: int | None = None):
        self.executor, self.tokenizer, self.cfg = executor, tokenizer, cfg
        self.managers = managers
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.scheduler = Scheduler(cfg, managers, place)
        self.eos = set(eos_token_ids) | set(tokenizer.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}

    # ------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> Sequence:
        if request_id in self.seqs:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.cfg.max_model_len:
            raise ValueError(f"prompt: {len(prompt_token_ids)} tokens leave no room under "
                             f"max_model_len={self.cfg.max_model_len}")
        seq = Sequence(request_id, list(prompt_token_ids), params, prompt=prompt,
                       arrival=time.monotonic())
        self.seqs[request_id] = seq
        self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its KV is freed on every backend."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if not seq.finished:
            self.scheduler.finish(seq, "abort")
        self._detok.pop(seq.seq_id, None)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def release(self, seq: Sequence) -> None:
        """Forget a finished sequence (the caller has taken its output)."""
        self.seqs.pop(seq.request_id, None)
        self._detok.pop(seq.seq_id, None)

    # ------------------------------------------------------------ the step
    def step(self) -> list[StepOutput]:
        chunks = self.scheduler.schedule()
        # sequences the scheduler gave up on (they can never fit) surface as finished
        outs = [StepOutput(s, [], "", True) for s in self.scheduler.rejected]
        self.scheduler.rejected.clear()
        if not chunks:
            return outs
        step_chunks = [StepChunk(c.seq.seq_id, c.start, c.seq.tokens(c.start, c.start + c.num_new),
                                 c.sample, c.seq.params, c.seq.generator) for c in chunks]
        toks = self.executor.execute(step_chunks, self.scheduler.items(chunks), self.take_freed())
        sampled = [c for c in chunks if c.sample]
        for c in chunks:
            c.seq.num_computed = c.start + c.num_new
        now = time.monotonic()
        for c, tok in zip(sampled, toks):
            seq = c.seq
            if seq.first_token_time is None:
                seq.first_token_time = now
            outs.append(self._append(seq, tok))
        return outs

    def take_freed(self) -> list[int]:
        """Sequence ids whose KV was freed since the last call (workers drop them)."""
        freed, self.scheduler.freed = self.scheduler.freed, []
        return freed

    def _append(self, seq: Sequence, tok: int) -> StepOutput:
        seq.output_token_ids.append(tok)
        p = seq.params
        reason = None
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"  # the stop token's text is not added
        else:
            old = len(seq.text)
            seq.text += self._detok[seq.seq_id].step([tok])
            if p.stop_list:
                longest = max(map(len, p.stop_list))
                lo = max(0, old - longest + 1)
                hits = [i for i in (seq.text.find(s, lo) for s in p.stop_list) if i >= 0]
                if hits:
                    seq.text = seq.text[:min(hits)]
                    reason = "stop"
        if reason is None and (len(seq.output_token_ids) >= p.max_tokens
                               or seq.num_tokens >= self.cfg.max_model_len):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
        # hold back a tail that could still become a stop string
        hold = 0 if reason or not p.stop_list else max(map(len, p.stop_list)) - 1
        upto = max(seq.emitted, len(seq.text) - hold)
        delta, seq.emitted = seq.text[seq.emitted:upto], upto
        return StepOutput(seq, [tok], delta, reason is not None)

    def run_to_completion(self, progress: Callable[[int], None] | None = None) -> None:
        while self.has_unfinished():
            for o in self.step():
                if o.finished and progress:
                    progress(1)


def build_managers(num_backends: int, kv_tokens: int, block_size: int) -> list[BlockManager]:
    return [BlockManager(max(1, kv_tokens // block_size), block_size) for _ in range(num_backends)]
