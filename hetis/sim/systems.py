"""The deployments ``hetis plan`` compares, each simulated over the project's own engine.

A system is a set of serving instances. An instance is a pipeline of sub-stages (a
GPU type, its layers, TP inside it), as :func:`hetis.sim.planner.plan` lays them out,
plus the attention workers it dispatches to. Four systems, as the Hetis paper's
evaluation deploys them (shared/papers/hetis.md, §7):

* **hetis**: the plan (the 5 % rule's leftovers become attention workers), the
  attention workers dealt round-robin to the instances, our dispatcher placing the
  head groups.
* **hexgen**: every GPU a primary: the same search without the 5 % rule (pipeline
  stages by GPU type, TP inside a stage, the layers split to balance the stages),
  prefill and decode on the same GPUs, the KV on the stages beside their layers.
  HexGen searches with its own scheduler; ours stands in for it.
* **splitwise**: a prefill instance on the strongest GPU type, a decode instance on
  the rest (each laid out by the search without the rule); a request's prompt KV
  goes from one to the other over the network before its decode starts.
* **vllm**: the strongest GPU type alone, data-parallel instances of TP x PP.

How an instance's step is timed (:class:`PipelineExecutor`). The engine runs one
batch per step; a pipeline of depth M runs it as m = min(M, sequences) micro-batches
(vLLM's virtual engines). A sub-stage's time for one micro-batch is its dense
modules, its TP all-reduces, the send to the next sub-stage (the LM head on the
last), and its share (its layers' fraction, divided by m) of the attention: the
primaries' own KV on that stage's GPUs, in parallel with the attention workers (the
slowest, its transfers included). The step takes ``max(sum of sub-stages, m x the
slowest)``: one micro-batch's trip, or the bottleneck stage busy all step. The
planner's C is the decode form of the same expression.

Instances run on their own virtual clocks in one event loop; arrivals are dealt
round-robin (a router without load information: the instances are alike). KV room:
a token needs its layers' KV on every sub-stage, so the primaries hold the smallest
of the sub-stages' ``free / (their layers x bytes per token and layer)``, less
:data:`hetis.sim.planner.RESERVE_FRAC` of every GPU.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

from hetis.engine.config import EngineConfig
from hetis.engine.dispatcher import Device
from hetis.engine.engine import build_engine
from hetis.engine.sampling import SamplingParams
from hetis.engine.step import AttnItem, Step
from hetis.sim.cluster import Cluster
from hetis.sim.costmodel import DeviceModel
from hetis.sim.hardware import load_gpus
from hetis.sim.planner import DEFAULT_EXPECTED_REQUESTS, RESERVE_FRAC, Plan, PlanError, plan
from hetis.sim.shapes import ModelShape
from hetis.sim.simulator import (BLOCK_SIZE, Clock, RequestStats, SimExecutor, SimResult, _Tokens,
                                 engine_model_config)
from hetis.sim.workloads import Request

SYSTEMS = ("hetis", "hexgen", "splitwise", "vllm")
SPLIT_BATCHED_TOKENS = 1 << 16   # a decode instance's imported prompts cost no compute


@dataclass(frozen=True)
class SubStage:
    gpu: str
    hosts: tuple[str, ...]     # one per GPU: tp of them
    layers: int
    first: bool                # holds the embedding table
    last: bool                 # holds the LM head

    @property
    def tp(self) -> int:
        return len(self.hosts)


@dataclass(frozen=True)
class Instance:
    substages: tuple[SubStage, ...]
    attention: tuple[tuple[str, str], ...] = ()    # (host, gpu) of its attention workers

    def describe(self) -> str:
        pipe = " > ".join(f"{s.tp}x {s.gpu} [{s.layers}]" for s in self.substages)
        att = f" + {len(self.attention)} attention" if self.attention else ""
        return pipe + att


@dataclass
class System:
    """``instances`` serve whole requests; Splitwise has ``prefill`` and ``decode``."""
    name: str
    plan: Plan
    instances: list[Instance] = field(default_factory=list)
    prefill: list[Instance] = field(default_factory=list)
    decode: list[Instance] = field(default_factory=list)
    decode_plan: Plan | None = None

    def kv_blocks(self, shape: ModelShape) -> int:
        """KV blocks (BLOCK_SIZE tokens x one group) of every instance, both sides of a
        split system counted."""
        gpus, total = load_gpus(), 0
        for inst in self.instances + self.prefill + self.decode:
            total += primaries_kv_tokens(shape, inst) // BLOCK_SIZE
            total += sum(DeviceModel(gpus[g]).kv_capacity_tokens(shape, 0.0) // BLOCK_SIZE
                         for _, g in inst.attention)
        return total

    def describe(self) -> str:
        if self.prefill:
            return (f"prefill {', '.join(i.describe() for i in self.prefill)}; decode "
                    f"{', '.join(i.describe() for i in self.decode)}")
        return f"{len(self.instances)}x ({self.instances[0].describe()})"


def _expand(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["host"], r["gpu"]) for r in rows for _ in range(r["count"])]


def instances_of(p: Plan, attention: bool = True) -> list[Instance]:
    """The plan's instances as sub-stages; its attention workers dealt round-robin
    (``attention=False``: left unused, as a system without attention workers does)."""
    pool = _expand(p.attention_workers) if attention else []
    out = []
    for k, stages in enumerate(p.stages):
        subs = []
        for i, st in enumerate(stages):
            hosts = [h for h, _ in _expand(st["hosts"])]
            q, r = divmod(st["layers"], st["pp"])
            for j in range(st["pp"]):
                subs.append(SubStage(st["gpu"], tuple(hosts[j * st["tp"]:(j + 1) * st["tp"]]),
                                     q + (j < r), i == 0 and j == 0,
                                     i == len(stages) - 1 and j == st["pp"] - 1))
        out.append(Instance(tuple(subs), tuple(pool[k::len(p.stages)])))
    return out


def systems_for(cluster: Cluster, shape: ModelShape, workload: str,
                expected_requests: int | None = None) -> dict[str, System | str]:
    """Every system of the module docstring on ``cluster``: a :class:`System`, or why it
    cannot be deployed (a string)."""
    gpus = load_gpus()
    order = sorted(cluster.gpu_counts(), key=lambda k: (gpus[k].fp16_tflops, gpus[k].mem_bw_gbs, k))
    strong, rest = order[-1], order[:-1]
    out: dict[str, System | str] = {}

    def attempt(name, make):
        try:
            out[name] = make()
        except PlanError as e:
            out[name] = str(e)
    attempt("hetis", lambda: _whole("hetis", plan(cluster, shape, workload, expected_requests)))
    attempt("hexgen", lambda: _whole("hexgen", plan(cluster, shape, workload, expected_requests,
                                                     rule=False), attention=False))
    if rest:
        def split():
            pre = plan(cluster.subset([strong]), shape, workload, expected_requests, rule=False)
            want = expected_requests or DEFAULT_EXPECTED_REQUESTS
            while True:   # the weaker GPUs may hold the weights and KV of fewer requests
                try:
                    dec = plan(cluster.subset(rest), shape, workload, want, rule=False)
                    break
                except PlanError:
                    if want == 1:
                        raise
                    want //= 2
            return System("splitwise", pre, prefill=instances_of(pre, False),
                          decode=instances_of(dec, False), decode_plan=dec)
        attempt("splitwise", split)
    else:
        out["splitwise"] = "one GPU type: nothing to split prefill from decode"
    attempt("vllm", lambda: _whole("vllm", plan(cluster.subset([strong]), shape, workload,
                                                 expected_requests, rule=False), attention=False))
    return out


def _whole(name: str, p: Plan, attention: bool = True) -> System:
    return System(name, p, instances=instances_of(p, attention))


# ---------------------------------------------------------------------------- timing


class PipelineExecutor(SimExecutor):
    """One instance's step time (module docstring). ``imported``: sequences whose first
    tokens' KV arrived from elsewhere (Splitwise's decode side): those cost nothing."""

    def __init__(self, clock: Clock, shape: ModelShape, inst: Instance, cluster: Cluster):
        gpus = load_gpus()
        net = cluster.link_between
        self.subs = []
        for j, s in enumerate(inst.substages):
            g = gpus[s.gpu]
            nxt = inst.substages[j + 1] if j + 1 < len(inst.substages) else None
            self.subs.append((s, DeviceModel(g), net(g, list(s.hosts), g, list(s.hosts)),
                              net(g, list(s.hosts), gpus[nxt.gpu], list(nxt.hosts)) if nxt else None))
        every = [h for s in inst.substages for h in s.hosts]
        first = gpus[inst.substages[0].gpu]
        workers = [(DeviceModel(gpus[g]), net(gpus[g], [h], first, every)) for h, g in inst.attention]
        super().__init__(clock, shape, self.subs[0][1], 1, None, workers)
        self.imported: dict[int, int] = {}

    def _own(self, it: AttnItem) -> AttnItem:
        """The part of an item computed here: past the imported tokens."""
        done = self.imported.get(it.seq_id, 0)
        if it.start >= done:
            return it
        return replace(it, start=done, num_new=it.start + it.num_new - done)

    def step_time(self, step: Step) -> float:
        shape, L = self.shape, self.shape.num_layers
        moves = 0.0
        for m in step.moves:
            nbytes = 2 * L * m.num_tokens * shape.head_dim * 2
            moves += sum(self.devices[b][1].time(nbytes) for b in (m.src, m.dst)
                         if self.devices[b][1] is not None)
        chunks = [(c.start + len(c.token_ids) - max(c.start, self.imported.get(c.seq_id, 0)), c.sample)
                  for c in step.chunks]
        n_tok = sum(max(0, n) for n, _ in chunks)
        n_seq = sum(1 for _, s in chunks if s)
        if not n_tok:
            return moves
        if self.imported:
            work = [[self._own(it) for it in items
                     if it.start + it.num_new > self.imported.get(it.seq_id, 0)]
                    for items in step.work]
        else:  # nothing imported: every item is computed here
            work = step.work
        remote = 0.0
        for b, items in enumerate(work[1:], start=1):
            if items:
                model, lk = self.devices[b]
                t = self._attention(model, items, False) + L * lk.time(
                    sum(it.num_new for it in items) * self.row_bytes)
                self.attn_s[b] += t
                remote = max(remote, t)
        m = max(1, min(len(self.subs), len(chunks)))
        b_tok, b_seq = n_tok / m, n_seq / m
        times = []
        own = self._tally(work[0]) if work[0] else None  # the same items on every sub-stage
        for s, model, ar, out in self.subs:
            frac = s.layers / L
            local = self._attention_time(model, own, False) / s.tp * frac if own else 0.0
            self.attn_s[0] += local
            t = model.dense_time(shape, b_tok, s.layers, tp=s.tp)
            if s.tp > 1:
                t += 2 * s.layers * ar.allreduce_time(b_tok * shape.hidden * 2, s.tp)
            t += out.time(b_tok * shape.hidden * 2) if out else model.lm_head_time(shape, b_seq, s.tp)
            times.append(t + max(local, remote * frac) / m)
        return moves + max(sum(times), m * max(times))


def primaries_kv_tokens(shape: ModelShape, inst: Instance) -> int:
    """Tokens x groups of KV the primaries hold (module docstring)."""
    gpus, per = load_gpus(), shape.kv_bytes_per_token / shape.num_layers
    embed = shape.vocab * shape.hidden * shape.bytes_per_param
    head = shape.lm_head_params * shape.bytes_per_param
    tokens = math.inf
    for s in inst.substages:
        extras = (embed if s.first else 0) + (head if s.last else 0)
        if s.first and s.last and shape.tied_embeddings:
            extras = embed
        free = s.tp * gpus[s.gpu].mem_bytes * (1 - RESERVE_FRAC) - s.layers * shape.layer_weight_bytes - extras
        tokens = min(tokens, free / (s.layers * per))
    return max(0, int(tokens)) * shape.num_groups


def _engine(inst: Instance, shape: ModelShape, cluster: Cluster, policy: str, batched: int,
            max_model_len: int, kv_headroom: int | None):
    clock = Clock()
    ex = PipelineExecutor(clock, shape, inst, cluster)
    subs, L = ex.subs, shape.num_layers
    a0 = sum(m.attention_coefficients(shape)[0] * s.layers / L / s.tp for s, m, _, _ in subs)
    b0 = sum(m.attention_coefficients(shape)[1] * s.layers / L / s.tp for s, m, _, _ in subs)
    devices = [Device("primary-0", primaries_kv_tokens(shape, inst) // BLOCK_SIZE, a0, b0)]
    for i, (model, lk) in enumerate(ex.devices[1:], start=1):
        a, b = model.attention_coefficients(shape)
        devices.append(Device(f"attn-{i}", model.kv_capacity_tokens(shape, 0.0) // BLOCK_SIZE,
                              a, b, remote=True, latency=lk.alpha_s, bandwidth=lk.bandwidth_bps))
    cfg = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=256, max_num_batched_tokens=batched,
                       max_model_len=max_model_len, kv_headroom=kv_headroom)
    engine = build_engine(ex, _Tokens(shape.vocab), engine_model_config(shape), cfg, devices,
                          policy=policy, kv_bytes=2, detokenize=False)
    return engine, ex, clock, [d.capacity_blocks for d in devices]


def simulate_system(system: System, shape: ModelShape, cluster: Cluster, requests: list[Request],
                    policy: str = "hetis", max_model_len: int = 4096,
                    kv_headroom: int | None = None) -> SimResult:
    """Every request through ``system`` on virtual clocks, one per instance."""
    split = bool(system.prefill)
    fronts = system.prefill if split else system.instances
    built = [_engine(i, shape, cluster, policy, 4096, max_model_len, kv_headroom) for i in fronts]
    backs = [_engine(i, shape, cluster, policy, SPLIT_BATCHED_TOKENS, max_model_len + 1,
                     kv_headroom) for i in system.decode]
    engines = built + backs
    kv_link = (cluster.link_between(*_ends(system.prefill[0]), *_ends(system.decode[0]))
               if split else None)
    stats = {r.request_id: RequestStats(r.request_id, r.arrival_s, r.prompt_len, r.output_len)
             for r in requests}
    events = [(r.arrival_s, n, n % len(built), r, False)
              for n, r in enumerate(sorted(requests, key=lambda r: (r.arrival_s, r.request_id)))]
    heapq.heapify(events)
    seq_of: dict[tuple[int, int], tuple[Request, bool]] = {}
    dead: set[int] = set()
    counter, handoffs = len(events), 0
    while True:
        busy = [(c.now, k) for k, (e, _, c, _) in enumerate(engines) if k not in dead and e.has_unfinished()]
        t_inst, k = min(busy) if busy else (math.inf, -1)
        if events and events[0][0] <= t_inst:
            t, _, target, r, second = heapq.heappop(events)
            engine, ex, clock, _ = engines[target]
            if not engine.has_unfinished() or target in dead:
                clock.now = max(clock.now, t)
                dead.discard(target)
            if second:   # the decode side: the prompt and the first token arrive as KV
                seq = engine.add_request(r.request_id, [1] * (r.prompt_len + 1), SamplingParams(
                    temperature=0, max_tokens=r.output_len - 1, ignore_eos=True))
                ex.imported[seq.seq_id] = r.prompt_len
            else:
                seq = engine.add_request(r.request_id, [1] * r.prompt_len, SamplingParams(
                    temperature=0, max_tokens=1 if split else r.output_len, ignore_eos=True))
            seq_of[(target, seq.seq_id)] = (r, second)
            continue
        if k < 0:
            break
        engine, ex, clock, _ = engines[k]
        before = clock.now
        for o in engine.step():
            r, second = seq_of[(k, o.seq.seq_id)]
            st = stats[r.request_id]
            if o.new_token_ids and st.first_token_s is None:
                st.first_token_s = clock.now
            if o.finished:
                engine.release(o.seq)
                if split and not second and r.output_len > 1:
                    arrive = clock.now + kv_link.time(r.prompt_len * shape.kv_bytes_per_token)
                    heapq.heappush(events, (arrive, counter, len(built) + handoffs % len(backs),
                                            r, True))
                    counter, handoffs = counter + 1, handoffs + 1
                else:
                    st.finish_s = clock.now
        if clock.now == before:   # nothing could run (memory): wait for an arrival, or give up
            if events:
                clock.now = max(clock.now, events[0][0])
            else:
                dead.add(k)
    blocks = [b for _, _, _, bl in engines for b in bl]
    attn = [t for _, ex, _, _ in engines for t in ex.attn_s]
    end = max((c.now for _, _, c, _ in engines), default=0.0)
    return SimResult(system.describe(), policy, list(stats.values()), end,
                     sum(ex.steps for _, ex, _, _ in engines), sum(blocks), blocks, attn,
                     sum(e.num_preemptions for e, _, _, _ in engines),
                     sum(1 for s in stats.values() if s.finish_s is None),
                     extra={"migrations": sum(e.migrations for e, _, _, _ in engines)})


def _ends(inst: Instance):
    """(GPU type, hosts) of an instance, for the link to another."""
    return load_gpus()[inst.substages[0].gpu], [h for s in inst.substages for h in s.hosts]


def system_max_rate(system: System, shape: ModelShape, cluster: Cluster, workload: str,
                    num_requests: int, seed: int, slo_ttft: float, slo_tpot: float,
                    max_model_len: int = 4096, rel_tol: float = 0.02, progress=None,
                    steady: float = 0.0):
    """(max rate, summary there) of ``system`` under the SLOs (:func:`search_rate`);
    ``steady``: the SLOs over the steady-state window (:meth:`SimResult.summary`)."""
    from hetis.sim.simulator import meets, search_rate
    from hetis.sim.workloads import make_requests

    def run(rate):
        reqs = make_requests(workload, rate, num_requests, seed, max_model_len=max_model_len)
        s = simulate_system(system, shape, cluster, reqs, max_model_len=max_model_len).summary(steady)
        if progress:
            progress(rate, s)
        return meets(s, slo_ttft, slo_tpot), s
    return search_rate(run, rel_tol)
