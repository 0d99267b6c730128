"""Live migration of head groups in-process (hetis/engine/migration.py): with a move forced
every other step, tokens stay identical to the engine without moves."""
from __future__ import annotations

from hetis import LLM, SamplingParams

PARAMS = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
          SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=16, ignore_eos=True)]


def test_tokens_identical_with_a_move_every_other_step(llm, prompts):
    moving = LLM(num_backends=3, policy="round-robin")
    moving.engine.cfg.migrate_every = 2
    moving.engine.cfg.max_move_tokens = 48  # the long prompt's groups are pre-copied in chunks
    reqs = [{"prompt_token_ids": p} for p in prompts[:3]]
    for sp in PARAMS:
        want = [o.token_ids for o in llm.generate(reqs, sp)]
        before = moving.engine.migrations
        assert [o.token_ids for o in moving.generate(reqs, sp)] == want
        assert moving.engine.migrations - before >= 3  # the groups did move, again and again
    eng = moving.engine
    assert eng.migrated_bytes > 0 and eng.num_preemptions == 0
    assert all(m.used_tokens == 0 for m in eng.managers)  # every source and destination freed


def test_a_full_backend_moves_head_groups_instead_of_preempting(llm, prompts):
    """Optimistic admission (headroom 0) on a small backend 0 beside a roomy backend 1:
    as sequences grow, backend 0 runs short and the latest arrivals' groups move to
    backend 1; nothing is recomputed and every token is as without moves."""
    poor = LLM(num_backends=2, policy="hetis", kv_tokens=[512, 8192], kv_headroom=0,
               max_model_len=512)
    reqs = [{"prompt_token_ids": p} for p in prompts[:6]]
    sp = PARAMS[1]  # seeded sampling (greedy and seeded moves: the test above)
    want = [o.token_ids for o in llm.generate(reqs, sp)]
    assert [o.token_ids for o in poor.generate(reqs, sp)] == want
    eng = poor.engine
    assert eng.migrations > 0 and eng.num_preemptions == 0
    assert all(m.used_tokens == 0 for m in eng.managers)
