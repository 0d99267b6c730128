"""Tensor parallelism (hetis/model/tp.py) with the real model over a real gloo group: two
ranks on two threads, each with its shard of the weights and its own head groups."""
from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from hetis import LLM, SamplingParams
from hetis.engine.step import Step, StepChunk
from hetis.model.attention import AttentionBackend
from hetis.model.dense import DenseModel
from hetis.model.executor import Executor
from hetis.model.loader import load
from hetis.model.tp import group_split, shard

WORLD = 2
PLACEMENT = [0, 1, 1]  # three backends' worth of groups; each rank serves its own of them


class TwoRanks:
    """The executor interface over WORLD tensor-parallel ranks (threads, one gloo group)."""

    def __init__(self, cfg, sd, num_backends: int, num_blocks: int, block_size: int):
        store = dist.HashStore()
        self.ranks: list[Executor] = [None] * WORLD
        self.groups = []

        def build(r):
            pg = dist.ProcessGroupGloo(store, r, WORLD, datetime.timedelta(seconds=120))

            def all_reduce(t):
                pg.allreduce([t]).wait()
                return t
            model = DenseModel(cfg, dict(sd), torch.float32)
            groups = shard(model, r, WORLD, all_reduce)
            backends = [AttentionBackend(cfg.num_layers, num_blocks, block_size, cfg.head_dim,
                                         cfg.q_per_group, torch.float32) for _ in range(num_backends)]
            self.ranks[r] = Executor(model, backends, groups)
        self._all(build)
        self.last_times = self.ranks[0].last_times

    def _all(self, fn):
        errors = []

        def run(r):
            try:
                fn(r)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        threads = [threading.Thread(target=run, args=(r,)) for r in range(1, WORLD)]
        for th in threads:
            th.start()
        run(0)
        for th in threads:
            th.join(120)
        if errors:
            raise errors[0]

    def run(self, method: str, step: Step):
        out = [None] * WORLD
        self._all(lambda r: out.__setitem__(r, getattr(self.ranks[r], method)(step)))
        return out

    def execute(self, step: Step) -> list[int]:
        return self.run("execute", step)[0]


@pytest.fixture(scope="module")
def weights():
    cfg, sd, _ = load(None, torch.float32)
    return cfg, sd


def test_groups_split_contiguously_and_tp_beyond_the_groups_is_refused():
    assert group_split(3, 2) == [range(0, 2), range(2, 3)]
    assert group_split(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="tp: must be between 1 and the model's 3"):
        group_split(3, 4)


def test_sharded_logits_within_1e4_of_the_whole_model(weights, llm, prompts):
    cfg, sd = weights
    whole = Executor(DenseModel(cfg, dict(sd), torch.float32),
                     [AttentionBackend(cfg.num_layers, 256, 16, cfg.head_dim, cfg.q_per_group,
                                       torch.float32) for _ in range(len(PLACEMENT))])
    tp = TwoRanks(cfg, sd, len(PLACEMENT), 256, 16)
    # a prefill of three prompts (each its own blocks), then one decode token each
    eng = LLM(placement=PLACEMENT).engine
    for i, p in enumerate(prompts[:3]):
        eng.add_request(f"p{i}", p, SamplingParams(temperature=0, max_tokens=2))
    for _ in range(2):
        chunks = eng.scheduler.schedule()
        step = Step([StepChunk(c.seq.seq_id, c.start, c.seq.tokens(c.start, c.start + c.num_new),
                               c.sample) for c in chunks], eng.scheduler.items(chunks))
        want = whole.forward(step)
        got = tp.run("forward", step)
        assert torch.equal(got[0], got[1])  # every rank has the whole logits
        assert (got[0] - want).abs().max().item() < 1e-4
        for c, tok in zip(chunks, want.argmax(-1).tolist()):
            c.seq.num_computed = c.start + c.num_new
            c.seq.output_token_ids.append(tok)


def test_tp_engine_tokens_identical_to_the_single_rank_engine(weights, llm, prompts):
    cfg, sd = weights
    split = LLM(placement=PLACEMENT)
    split.engine.instances[0].executor = TwoRanks(cfg, sd, len(PLACEMENT), split.engine_config.kv_tokens // 16, 16)
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=16, ignore_eos=True)]
    reqs = [{"prompt_token_ids": p} for p in prompts[:3]]
    for sp in params:
        want = [o.token_ids for o in llm.generate(reqs, sp)]
        assert [o.token_ids for o in split.generate(reqs, sp)] == want
