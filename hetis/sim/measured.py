"""A device model measured on this machine, to check the simulator against reality.

The roofline models (hetis/sim/costmodel.py) describe GPUs we do not have; nothing
here can run on them. What can be checked is the simulator itself: calibrate a device
model on this machine's CPU with the real model and the real executor, simulate the
workload ``make bench`` runs, and compare the predicted output throughput with the one
``hetis bench`` measures (``sim_vs_real_error`` in bench/results/summary.json).

:func:`calibrate` runs two small workloads (other lengths than the one predicted)
through ``hetis bench``'s own local target, records every executed step's time and
shape, and fits the simulator's step form by least squares (coefficients >= 0)::

    step = d0 + p1 * tokens + (d1 - p1) * sampled sequences
           + a_tok * KV tokens read + a_grp * (sequence, group) decode pairs
           + p_attn * prefill attention flops

plus what the run's wall time shows beyond its steps (the serving loop, the client
threads, Python's lock shared with the compute threads): ``e0`` per step and ``e1`` per
sequence. ``dense_time`` is ``d0 + e0 + p1 * tokens``, ``lm_head_time`` the per-sequence
rest, decode attention ``a_tok``/``a_grp`` (whole model; per layer for the dispatcher).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hetis.sim.shapes import ModelShape


@dataclass
class MeasuredDevice:
    """Whole-model step costs measured here (seconds), in the cost model's interface."""
    d0: float        # per step: the floor (launches, Python, sampling setup)
    d1: float        # per sampled sequence in a decode step, its one token's dense share included
    p1: float        # per token of a prefill chunk (dense modules)
    a_tok: float     # decode attention per token x group read (all layers)
    a_grp: float     # decode attention per (sequence, group) pair (all layers)
    p_attn: float    # prefill attention per flop (all layers)
    kv_tokens: int   # KV capacity, tokens x groups
    e0: float = 0.0  # the engine's own time per step (scheduling, dispatch, step building)
    e1: float = 0.0  # ... and per sequence in the step
    name: str = "cpu"

    def dense_time(self, shape: ModelShape, num_tokens: int, layers: int, tp: int = 1) -> float:
        return self.d0 + self.e0 + self.p1 * num_tokens

    def lm_head_time(self, shape: ModelShape, num_seqs: int, tp: int = 1) -> float:
        # a decode step's per-sequence cost beyond its one token's dense share, and the
        # engine's per-sequence bookkeeping (only sampling chunks are counted: close enough)
        return (max(self.d1 - self.p1, 0.0) + self.e1) * num_seqs

    def decode_attention_time(self, shape: ModelShape, tokens_read: int, groups: int,
                              layers: int) -> float:
        return self.a_tok * tokens_read + self.a_grp * groups

    def attention_coefficients(self, shape: ModelShape) -> tuple[float, float]:
        return self.a_tok / shape.num_layers, self.a_grp / shape.num_layers

    def attention_flops_time(self, flops: float) -> float:
        return self.p_attn * flops  # called once per layer with one layer's flops

    def kv_capacity_tokens(self, shape: ModelShape, weight_bytes_here: float,
                           reserve_frac: float = 0.0) -> int:
        return self.kv_tokens


def shape_of(cfg, name: str = "model", bytes_per_param: int = 2) -> ModelShape:
    """The cost model's shape of a loaded model (hetis.model.config.ModelConfig)."""
    return ModelShape(name=name, num_layers=cfg.num_layers, hidden=cfg.hidden_size,
                      num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                      head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
                      vocab=cfg.vocab_size, gated_mlp=True, bytes_per_param=bytes_per_param,
                      tied_embeddings=cfg.tie_word_embeddings)


# (requests, prompt lengths, output length): other lengths than make bench's workload, chosen
# to span what a step can be: many short sequences, few long ones, and between
CALIBRATION_RUNS = [
    (64, (16, 64), 12),
    (16, (448, 640), 16),
    (32, (128, 384), 16),
]


def step_shape(step, shape: ModelShape) -> tuple:
    """(tokens, sampled sequences, KV tokens read by decode items, decode (sequence, group)
    pairs, prefill attention flops over all layers) of a step, over all its devices."""
    items = [it for per in step.work for it in per]
    dec = [it for it in items if it.num_new == 1]
    pre = sum(4 * shape.head_dim * shape.q_per_group * it.num_new * (it.start + (it.num_new + 1) / 2)
              for it in items if it.num_new > 1)
    return (step.num_tokens, sum(c.sample for c in step.chunks), sum(it.start + 1 for it in dec),
            len(dec), shape.num_layers * pre)


def record_steps(executor, shape: ModelShape, sink) -> None:
    """Wrap ``executor.execute``: every step's ``(seconds, *step_shape)`` goes to ``sink``
    (also when it fails). Undo with ``del executor.execute``."""
    inner = executor.execute

    def recorded(step):
        t0 = time.perf_counter()
        try:
            return inner(step)
        finally:
            sink((time.perf_counter() - t0, *step_shape(step, shape)))
    executor.execute = recorded


def calibrate(target, progress=lambda msg: None) -> MeasuredDevice:
    """Fit a :class:`MeasuredDevice` on this machine from real steps.

    ``target`` is ``hetis bench``'s :class:`~hetis.bench.targets.LocalTarget` (the
    engine behind a ServingLoop thread, one client thread per request: what the
    benchmark measures). Small calibration workloads (:data:`CALIBRATION_RUNS`, other
    lengths than the workload later predicted) run through it with every executed step
    recorded: its time and its shape (:func:`step_shape`). Least squares over the steps
    gives the step formula; the wall time the run took beyond its steps' (the serving
    loop, the client threads, Python's lock shared with the compute threads) is charged
    per step and per sequence (:func:`fit`).
    """
    llm = target.llm
    ex = llm.engine.executor
    steps: list[tuple] = []
    record_steps(ex, shape_of(llm.model_config), steps.append)
    try:
        runs = calibration_runs(target, lambda: steps, progress)
    finally:
        del ex.execute
    return fit(steps, runs, llm.engine_config.kv_tokens, progress)


def calibration_runs(target, steps, progress=lambda msg: None) -> list[tuple]:
    """Run :data:`CALIBRATION_RUNS` through ``target``; per run (its steps, wall seconds).
    ``steps()`` returns every step recorded so far (wherever the recorder runs)."""
    from hetis.bench.runner import run_requests
    from hetis.bench.workloads import BenchRequest
    rng = np.random.default_rng(12345)
    runs = []
    for n, (lo, hi), out in CALIBRATION_RUNS:
        reqs = [BenchRequest([1] * int(k), out) for k in rng.integers(lo, hi + 1, size=n)]
        first = len(steps())
        _, wall = run_requests(target, reqs, progress=False)
        run = steps()[first:]
        runs.append((run, wall))
        progress(f"{n} requests of {lo}-{hi} + {out} tokens: {len(run)} steps, "
                 f"{wall:.1f} s wall, {sum(r[0] for r in run):.1f} s in steps")
    return runs


def fit(steps: list[tuple], runs: list[tuple], kv_tokens: int,
        progress=lambda msg: None, name: str = "cpu") -> MeasuredDevice:
    """The step formula by least squares over ``steps`` (coefficients >= 0), and the
    overhead beyond the steps from ``runs`` (steps, wall) per step and per sequence."""
    A = np.array([[1.0, tok, samp, read, grp, flops] for _, tok, samp, read, grp, flops in steps])
    y = np.array([r[0] for r in steps])
    coef = _nonneg_lstsq(A, y)
    d0, p1, d1s, a_tok, a_grp, p_attn = (float(c) for c in coef)
    rows = np.array([[len(run), sum(r[2] for r in run)] for run, _ in runs], dtype=float)
    ys = np.array([wall - sum(r[0] for r in run) for run, wall in runs])
    e0, e1 = (float(c) for c in _nonneg_lstsq(rows, ys))
    progress(f"fit over {len(steps)} steps: d0 {d0 * 1e3:.1f} ms, {p1 * 1e6:.0f} us/token, "
             f"{d1s * 1e6:.0f} us/sampled, {a_tok * 1e9:.0f} ns/token read, "
             f"overhead {e0 * 1e3:.2f} ms/step + {e1 * 1e6:.0f} us/sequence")
    # d1 is the whole per-sampled-sequence cost of a decode step (its token's dense share too)
    return MeasuredDevice(d0, d1s + p1, p1, a_tok, a_grp, p_attn, kv_tokens, e0, e1, name)


def _nonneg_lstsq(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (costs cannot be negative)."""
    from scipy.optimize import nnls
    scale = np.maximum(np.abs(A).max(axis=0), 1e-30)  # columns differ by 10 orders of magnitude
    x, _ = nnls(A / scale, y)
    return x / scale
