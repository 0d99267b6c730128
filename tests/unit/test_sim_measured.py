"""The simulator's calibration from recorded steps (hetis/sim/measured.py): what a step
records, and that the fit recovers the costs that made the times."""
from __future__ import annotations

import numpy as np
import pytest

from hetis.engine.step import AttnItem, Step, StepChunk
from hetis.sim.measured import fit, record_steps, step_shape
from hetis.sim.shapes import model_shape

SHAPE = model_shape("llama-2-7b")


def a_step():
    """One prefill chunk of 8 tokens (two groups, on two devices) and one decode token."""
    return Step([StepChunk(0, 0, [1] * 8, sample=True), StepChunk(1, 99, [1], sample=True)],
                [[AttnItem(0, 0, 0, 8, []), AttnItem(1, 0, 99, 1, [])],
                 [AttnItem(0, 1, 0, 8, []), AttnItem(1, 1, 99, 1, [])]])


def test_a_step_records_its_shape_over_every_device():
    tok, sampled, read, pairs, flops = step_shape(a_step(), SHAPE)
    assert (tok, sampled, read, pairs) == (9, 2, 2 * 100, 2)
    per_item = 4 * SHAPE.head_dim * SHAPE.q_per_group * 8 * (0 + 9 / 2)
    assert flops == pytest.approx(SHAPE.num_layers * 2 * per_item)


def test_the_recorder_wraps_execute_and_undoes():
    class Ex:
        def execute(self, step):
            return [7]
    ex, got = Ex(), []
    record_steps(ex, SHAPE, got.append)
    assert ex.execute(a_step()) == [7]
    assert len(got) == 1 and got[0][0] >= 0 and got[0][1:] == step_shape(a_step(), SHAPE)
    del ex.execute
    ex.execute(a_step())
    assert len(got) == 1


def test_the_fit_recovers_the_costs_that_made_the_times():
    rng = np.random.default_rng(0)
    true = dict(d0=2e-3, p1=50e-6, d1s=300e-6, a_tok=40e-9, a_grp=2e-6, p_attn=1e-12)
    steps = []
    for _ in range(300):
        tok, samp = int(rng.integers(1, 600)), int(rng.integers(1, 64))
        read, grp, fl = int(rng.integers(0, 50_000)), int(rng.integers(0, 200)), float(rng.uniform(0, 5e9))
        t = (true["d0"] + true["p1"] * tok + true["d1s"] * samp + true["a_tok"] * read
             + true["a_grp"] * grp + true["p_attn"] * fl)
        steps.append((t, tok, samp, read, grp, fl))
    # two runs (different step counts) whose walls exceed their steps by 1 ms a step and
    # 20 us a sequence-step

    def run(part):
        return part, sum(s[0] for s in part) + 1e-3 * len(part) + 20e-6 * sum(s[2] for s in part)
    runs = [run(steps[:150]), run(steps[150:220])]
    dev = fit(steps, runs, kv_tokens=1000)
    assert dev.d0 == pytest.approx(true["d0"], rel=1e-6)
    assert dev.p1 == pytest.approx(true["p1"], rel=1e-6)
    assert dev.d1 == pytest.approx(true["d1s"] + true["p1"], rel=1e-6)
    assert dev.a_tok == pytest.approx(true["a_tok"], rel=1e-6)
    assert dev.e0 == pytest.approx(1e-3, rel=1e-6) and dev.e1 == pytest.approx(20e-6, rel=1e-6)
    assert dev.kv_tokens == 1000
