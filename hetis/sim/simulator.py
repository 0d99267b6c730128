"""The simulator: the project's own engine (scheduler, dispatcher, block managers) on a
virtual clock, with an executor that charges each step a cost-model time instead of
computing it.

Nothing of the scheduling code is forked: :func:`simulate` builds the engine with
:func:`hetis.engine.engine.build_engine`, exactly as ``hetis.LLM`` and the router do,
and hands it a :class:`SimExecutor` whose ``execute(step)`` advances a
:class:`Clock` by the step's predicted time and returns one token per sampling chunk
(never EOS: requests end at their workload's output length, ``ignore_eos``). A
change in the scheduler or the dispatcher changes the simulation.

A deployment (:class:`Deployment`) is one primary instance (``primary_count`` GPUs of
one type, tensor parallel: the dense modules' time is that of a ``tp``-way split plus
two ring all-reduces per layer) whose own KV cache is device 0 of dispatch, and any
number of attention workers (one per GPU; devices 1..N), each behind a link to the
primary (alpha-beta). Per step::

    time = dense(all tokens) + all-reduces + LM head
           + max over devices (attention of its items + transfer of its rows)

where a device's attention is decode attention (memory-bound: KV bytes read) for
one-token items and causal prefill attention (compute-bound) for longer chunks, and
a remote device's transfer is, per layer, ``alpha + rows * row_bytes / bandwidth``
(q and the output out and back, k and v out: what hetis/mesh/tensor_path.py sends).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hetis.engine.config import EngineConfig
from hetis.engine.dispatcher import Device
from hetis.engine.engine import build_engine
from hetis.engine.sampling import SamplingParams
from hetis.engine.step import Step
from hetis.model.config import ModelConfig
from hetis.sim.costmodel import DeviceModel
from hetis.sim.hardware import Link, link, load_gpus
from hetis.sim.shapes import ModelShape
from hetis.sim.workloads import Request

BLOCK_SIZE = 16


class Clock:
    """Virtual seconds; only the executor and the arrival loop move it."""

    def __init__(self):
        self.now = 0.0


@dataclass(frozen=True)
class AttentionPool:
    """``count`` attention workers of one GPU type, each behind ``link`` to the primary."""
    gpu: str
    count: int
    link: str = "ethernet-100g"


@dataclass(frozen=True)
class Deployment:
    primary_gpu: str
    primary_count: int = 1                 # GPUs of the primary instance (tensor parallel)
    intra_link: str = "nvlink"             # between the primary's GPUs (all-reduce)
    attention: tuple[AttentionPool, ...] = ()

    def describe(self) -> str:
        att = ", ".join(f"{p.count}x {p.gpu} over {p.link}" for p in self.attention) or "none"
        return f"primary {self.primary_count}x {self.primary_gpu} (TP); attention workers: {att}"


class _Tokens:
    """The engine wants a tokenizer for EOS and vocabulary checks only (no text here)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos_token_ids = vocab_size, ()


def engine_model_config(shape: ModelShape) -> ModelConfig:
    return ModelConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                       intermediate_size=shape.intermediate, num_layers=shape.num_layers,
                       num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                       head_dim=shape.head_dim, max_position=1 << 20)


class SimExecutor:
    """``execute(step)``: advance the clock by the step's predicted time; sample token 1.
    Head-group moves (re-dispatch) cost their KV bytes over the links they cross (an
    attention worker's link on each end that is not the primary), before the step."""

    supports_moves = True

    def __init__(self, clock: Clock, shape: ModelShape, primary: DeviceModel, tp: int,
                 intra: Link, attention: list[tuple[DeviceModel, Link]]):
        self.clock, self.shape, self.primary, self.tp, self.intra = clock, shape, primary, tp, intra
        self.devices = [(primary, None)] + attention
        # bytes of one (token, group) row on the wire per layer: q and out (q_per_group
        # heads each), k and v (one head each), 2-byte elements
        self.row_bytes = (2 * shape.q_per_group + 2) * shape.head_dim * 2
        self.steps, self.busy_s = 0, 0.0
        self.attn_s = [0.0] * len(self.devices)

    def execute(self, step: Step) -> list[int]:
        t = self.step_time(step)
        self.clock.now += t
        self.steps += 1
        self.busy_s += t
        return [1 for c in step.chunks if c.sample]

    def step_time(self, step: Step) -> float:
        shape, L = self.shape, self.shape.num_layers
        n_tok = step.num_tokens
        n_sampled = sum(1 for c in step.chunks if c.sample)
        moves = 0.0
        for m in step.moves:  # K and V, every layer, 2-byte elements
            nbytes = 2 * L * m.num_tokens * shape.head_dim * 2
            moves += sum(self.devices[b][1].time(nbytes) for b in (m.src, m.dst)
                         if self.devices[b][1] is not None)
        if not n_tok:
            return moves
        dense = self.primary.dense_time(shape, n_tok, L, tp=self.tp)
        dense += self.primary.lm_head_time(shape, n_sampled, tp=self.tp)
        if self.tp > 1:  # two ring all-reduces of the activations per layer
            nbytes = 2 * (self.tp - 1) / self.tp * n_tok * shape.hidden * 2
            dense += 2 * L * self.intra.time(nbytes)
        slowest = 0.0
        for b, items in enumerate(step.work):
            if not items:
                continue
            model, lk = self.devices[b]
            t = self._attention(model, items, b == 0)
            if lk is not None:
                rows = sum(it.num_new for it in items)
                t += L * lk.time(rows * self.row_bytes)
            self.attn_s[b] += t
            slowest = max(slowest, t)
        return moves + dense + slowest

    def _attention(self, model: DeviceModel, items, primary: bool) -> float:
        return self._attention_time(model, self._tally(items), primary)

    def _tally(self, items) -> tuple[int, int, list[float]]:
        """(tokens read by the decode items, their count, the prefill chunks' flops in item
        order) of one device's items: what its attention time depends on."""
        starts = [it.start for it in items if it.num_new == 1]
        if len(starts) == len(items):  # decode only: the common step
            return sum(starts) + len(starts), len(starts), []
        c = 4 * self.shape.head_dim * self.shape.q_per_group
        # causal attention of a chunk: its rows against start + row tokens each
        flops = [c * it.num_new * (it.start + (it.num_new + 1) / 2) for it in items if it.num_new != 1]
        return sum(starts) + len(starts), len(starts), flops

    def _attention_time(self, model: DeviceModel, tally, primary: bool) -> float:
        L = self.shape.num_layers
        tokens_read, groups, flops = tally
        prefill = 0.0
        for f in flops:
            prefill += L * model.attention_flops_time(f)
        t = prefill
        if groups:
            t += model.decode_attention_time(self.shape, tokens_read, groups, L)
        return t / self.tp if primary else t  # the primary's groups are split over its TP ranks


@dataclass
class RequestStats:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot(self) -> float:
        return (self.finish_s - self.first_token_s) / max(self.output_len - 1, 1)


@dataclass
class SimResult:
    deployment: str
    policy: str
    requests: list[RequestStats]
    duration_s: float
    steps: int
    kv_blocks: int                     # KV blocks (of BLOCK_SIZE tokens x one group) in the cluster
    kv_blocks_per_device: list[int]
    attention_busy_s: list[float]      # predicted attention seconds per device
    preemptions: int
    unfinished: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self, steady: float = 0.0) -> dict:
        """The run's figures. ``steady`` (0 to < 0.5): TTFT and TPOT percentiles over the
        steady-state window only: the first and last ``steady`` of the requests by arrival
        are left out (the warm-up, while the batch fills, and the cool-down, while it
        drains); completion, throughput and ``unfinished`` still count every request."""
        if not 0.0 <= steady < 0.5:
            raise ValueError(f"steady: must be in [0, 0.5) (got {steady!r})")
        every = [r for r in self.requests if r.finish_s is not None]
        done = every
        if steady:
            order = sorted(self.requests, key=lambda r: (r.arrival_s, r.request_id))
            cut = int(steady * len(order))
            keep = {r.request_id for r in order[cut:len(order) - cut]}
            done = [r for r in every if r.request_id in keep]
        ttft = np.array([r.ttft for r in done]) if done else np.zeros(1)
        tpot = np.array([r.tpot for r in done if r.output_len > 1]) if done else np.zeros(1)
        out_tokens = sum(r.output_len for r in every)

        def pct(a, q):
            return float(np.percentile(a, q)) if len(a) else float("nan")
        return {
            "deployment": self.deployment, "policy": self.policy,
            "requests": len(self.requests), "completed": len(every), "unfinished": self.unfinished,
            "duration_s": self.duration_s, "steps": self.steps,
            "output_tok_s": out_tokens / self.duration_s if self.duration_s else 0.0,
            "request_rate_done": len(every) / self.duration_s if self.duration_s else 0.0,
            "steady": steady, "measured_requests": len(done),
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p95_s": pct(tpot, 95), "tpot_p99_s": pct(tpot, 99),
            "kv_blocks": self.kv_blocks, "kv_blocks_per_device": self.kv_blocks_per_device,
            "attention_busy_s": self.attention_busy_s, "preemptions": self.preemptions,
            "migrations": self.extra.get("migrations", 0),
        }


def build(dep: Deployment, shape: ModelShape, clock: Clock, policy: str = "hetis",
          max_num_seqs: int = 256, max_num_batched_tokens: int = 4096,
          max_model_len: int = 4096, measured: dict | None = None,
          kv_headroom: int | None = None):
    """(engine, executor, KV blocks per device) of a deployment, over the real engine.
    ``measured`` maps device names to device models measured elsewhere (a
    :class:`hetis.sim.measured.MeasuredDevice`), used instead of a GPU's roofline.
    ``kv_headroom``: re-dispatch's optimistic admission (``EngineConfig``; moves cost
    their bytes over the links, ``SimExecutor``)."""
    gpus, measured = load_gpus(), measured or {}
    for name in [dep.primary_gpu] + [p.gpu for p in dep.attention]:
        if name not in gpus and name not in measured:
            raise ValueError(f"gpu: unknown {name!r} (known: {', '.join(sorted(gpus))})")

    def model_of(name):
        return measured[name] if name in measured else DeviceModel(gpus[name])
    primary = model_of(dep.primary_gpu)
    tp = dep.primary_count
    # the primary holds the whole model's weights, split over its TP ranks
    primary_kv = tp * primary.kv_capacity_tokens(shape, shape.weight_bytes / tp)
    if primary_kv <= 0:
        raise ValueError(f"deployment: {shape.name} does not fit on {tp}x {dep.primary_gpu} "
                         "(no room for weights and KV)")
    intra = link(dep.intra_link, gpu=gpus.get(dep.primary_gpu)) if tp > 1 else link("pcie4")
    models = [(model_of(p.gpu), link(p.link)) for p in dep.attention for _ in range(p.count)]
    kv_tokens = [primary_kv] + [m.kv_capacity_tokens(shape, 0.0) for m, _ in models]
    devices = []
    for i, (kv, (model, lk)) in enumerate(zip(kv_tokens, [(primary, None)] + models)):
        per_token, per_group = model.attention_coefficients(shape)
        if i == 0:
            per_token, per_group = per_token / tp, per_group / tp
        devices.append(Device(f"{'primary' if i == 0 else 'attn'}-{i}", max(kv // BLOCK_SIZE, 0),
                              per_token, per_group, remote=i > 0,
                              latency=lk.alpha_s if lk else 0.0,
                              bandwidth=lk.bandwidth_bps if lk else math.inf))
    executor = SimExecutor(clock, shape, primary, tp, intra, models)
    cfg = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                       kv_headroom=kv_headroom)
    mc = engine_model_config(shape)
    engine = build_engine(executor, _Tokens(shape.vocab), mc, cfg, devices, policy=policy,
                          kv_bytes=2, detokenize=False)
    return engine, executor, [d.capacity_blocks for d in devices]


def simulate(dep: Deployment, shape: ModelShape, requests: list[Request], policy: str = "hetis",
             max_num_seqs: int = 256, max_num_batched_tokens: int = 4096,
             max_model_len: int = 4096, progress=None, measured: dict | None = None,
             kv_headroom: int | None = None) -> SimResult:
    """Run ``requests`` through ``dep`` on a virtual clock; every request's timings."""
    clock = Clock()
    engine, executor, blocks = build(dep, shape, clock, policy, max_num_seqs,
                                     max_num_batched_tokens, max_model_len, measured, kv_headroom)
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    stats = {r.request_id: RequestStats(r.request_id, r.arrival_s, r.prompt_len, r.output_len)
             for r in pending}
    by_seq: dict[int, RequestStats] = {}
    i = 0
    while i < len(pending) or engine.has_unfinished():
        if not engine.has_unfinished() and pending[i].arrival_s > clock.now:
            clock.now = pending[i].arrival_s  # idle until the next arrival
        while i < len(pending) and pending[i].arrival_s <= clock.now:
            r = pending[i]
            seq = engine.add_request(r.request_id, [1] * r.prompt_len,
                                     SamplingParams(temperature=0, max_tokens=r.output_len,
                                                    ignore_eos=True))
            by_seq[seq.seq_id] = stats[r.request_id]
            i += 1
        before = clock.now
        for o in engine.step():
            st = by_seq[o.seq.seq_id]
            if o.new_token_ids and st.first_token_s is None:
                st.first_token_s = clock.now
            if o.finished:
                st.finish_s = clock.now
                engine.release(o.seq)
                if progress:
                    progress(1)
        if clock.now == before and engine.has_unfinished():
            if i < len(pending):  # nothing could run (memory): wait for the next arrival
                clock.now = max(clock.now, pending[i].arrival_s)
            else:
                break  # nothing can ever run: the rest stays unfinished
    unfinished = sum(1 for s in stats.values() if s.finish_s is None)
    return SimResult(dep.describe(), policy, list(stats.values()), clock.now, executor.steps,
                     sum(blocks), blocks, executor.attn_s, engine.num_preemptions,
                     unfinished, extra={"migrations": engine.migrations})


def meets(summary: dict, slo_ttft: float, slo_tpot: float) -> bool:
    """Every request done, and P95 TTFT and TPOT within the SLOs (the paper's criterion)."""
    return (summary["unfinished"] == 0 and summary["ttft_p95_s"] <= slo_ttft
            and summary["tpot_p95_s"] <= slo_tpot)


def max_rate(dep: Deployment, shape: ModelShape, workload: str, num_requests: int, seed: int,
             slo_ttft: float, slo_tpot: float, policy: str = "hetis", rel_tol: float = 0.02,
             max_model_len: int = 4096, **engine_kw) -> tuple[float, dict | None]:
    """The highest Poisson rate (req/s) at which ``dep`` meets both SLOs, and the summary
    there (:func:`search_rate`)."""
    from hetis.sim.workloads import make_requests

    def run(rate):
        reqs = make_requests(workload, rate, num_requests, seed, max_model_len=max_model_len)
        s = simulate(dep, shape, reqs, policy, max_model_len=max_model_len, **engine_kw).summary()
        return meets(s, slo_ttft, slo_tpot), s
    return search_rate(run, rel_tol)


def search_rate(run, rel_tol: float = 0.02) -> tuple[float, dict | None]:
    """The highest rate at which ``run(rate) -> (meets the SLOs, summary)`` holds:
    (0, None) if even a trickle misses them, (inf, ...) if all the requests at once
    meet them (ask with more requests). Doubles from 0.125 req/s until the SLOs fail, then
    bisects to ``rel_tol``; one seed gives the same requests at every rate, so only the
    load changes between runs. Few requests measure a transient, not a steady state."""
    ok, s = run(math.inf)
    if ok:  # all at once meets them: no rate is too high for this many requests
        return math.inf, s
    good, good_s, rate = 0.0, None, 0.125
    while rate <= 4096:
        ok, s = run(rate)
        if not ok:
            break
        good, good_s, rate = rate, s, rate * 2
    bad = rate
    while good and bad - good > rel_tol * good:
        mid = (good + bad) / 2
        ok, s = run(mid)
        if ok:
            good, good_s = mid, s
        else:
            bad = mid
    return good, good_s
