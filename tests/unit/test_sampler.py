"""The sampler: per-row parameters, and no accepted value can fail or change another row."""
from __future__ import annotations

import pytest
import torch

from hetis.engine.sampling import SAMPLING_EPS, SamplingParams
from hetis.model.sampler import sample


def test_tiny_temperatures_are_greedy_and_harm_no_other_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000) * 20
    params = [SamplingParams(temperature=1e-45), SamplingParams(temperature=0.0),
              SamplingParams(temperature=SAMPLING_EPS / 2)]
    out = sample(logits, params, [0, 1, 2])
    assert out == logits.argmax(-1).tolist()
    assert all(p.greedy for p in params) and not SamplingParams(temperature=SAMPLING_EPS).greedy


def test_seeded_rows_depend_on_seed_and_position_only():
    logits = torch.randn(2, 500)
    p = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=3)
    a = sample(logits[:1], [p], [17])
    b = sample(torch.stack([logits[1], logits[0]]), [SamplingParams(temperature=1e-30), p], [4, 17])
    assert a[0] == b[1]
    # the draw depends on the position: over many positions a flat distribution is not constant
    flat = torch.zeros(1, 500)
    assert len({sample(flat, [p], [pos])[0] for pos in range(20)}) > 10


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_row_of_non_finite_logits_falls_back_to_argmax(bad):
    logits = torch.randn(2, 100)
    logits[1, 7] = bad
    out = sample(logits, [SamplingParams(temperature=1.0, seed=1)] * 2, [3, 3])
    assert 0 <= out[0] < 100 and out[1] == int(logits[1].argmax())
