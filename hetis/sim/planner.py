"""``hetis plan``'s search: the paper's §4.1 deployment of the dense path on a mixed fleet.

:func:`plan` minimises C(sigma) = communication + computation of the dense modules,
hierarchically: (1) split the GPUs into data-parallel instances, every type spread
evenly, dropping splits without KV room for the expected requests; (2) in an instance
all GPUs of one type form one pipeline stage, layers mapped to minimise the slowest
stage's compute (no comms); (3) the 5 % rule: take GPUs out one at a time, lowest-end
type first (fp16_tflops), while C(without) / C(with) <= 1.05: they become attention
workers; (4) TP x PP inside each stage, the cheapest kept. What the paper leaves open:

* **C** is the dense part of a request's time per output token at the expected load: a
  pipeline of depth M (sub-stages of all stages) runs M micro-batches, so C = M x the
  slowest sub-stage (dense_time + 2 ring all-reduces per layer + the activation send to
  the next sub-stage, or the LM head on the last), comms not overlapped; of the slowest
  instance. Weight-bound, depth costs latency; compute-bound, it is nearly free.
  Attention and the pool's traffic are outside C, as in the paper.
* **Load**: ``expected_requests`` concurrent requests (default
  :data:`DEFAULT_EXPECTED_REQUESTS`: ShareGPT at the paper's 1.5 req/s x 338 output
  tokens x 40-65 ms per token is 20-33 in flight); each brings (prompt + output) /
  output tokens per step (its prompt spread over its decode steps; means from
  :func:`hetis.sim.workloads.describe`); an instance gets 1/d, a micro-batch 1/(d M).
* **KV room**: requests x mean (prompt + output) tokens. The attention pool (shared by
  all instances) holds what it can, the rest stays free on the primaries beside their
  layers (a stage keeps its own layers' KV). :data:`RESERVE_FRAC` of every GPU is never
  used (vLLM's gpu_memory_utilization 0.9).
* **Instances**: d divides every type's count; a type's GPUs fill instance after
  instance, largest host first (few hosts per instance). Lowest C wins, ties the fewer.
* **Stages**, weakest type first: the embedding table (memory only) on the first, the
  LM head on the last, the strongest. Step 2 is greedy, "next layer to the stage that
  would finish it soonest" (optimal for equal layers on stages of unequal speed), a
  stage computing as its GPUs in ideal TP. A stage left without layers holds nothing:
  its GPUs join the attention workers.
* **The 5 % rule** compares step 2's C (M x the slowest stage's compute, ideal TP): the
  splits are step 4's, and real ones would make odd counts (3 GPUs: no TP over 64
  heads) a cliff that stops a weak stage from being emptied one GPU at a time. With d
  instances one GPU leaves each at once (they stay alike), from the host with fewest of
  its type. A refusal ends that type; stronger types are still tried. In a stage of n
  GPUs of one type each adds ~1/n, so past n ~ 20 the rule thins even the strongest.
* **TP x PP**: tp divides the query heads; pp = as many sub-stages of tp GPUs as GPUs
  and layers allow (the rest join the attention workers); layers split evenly; one
  choice for all instances. Groups on one host talk over the intra-host link, else
  Ethernet. All combinations up to :data:`MAX_COMBOS`, then coordinate descent from the
  widest TP. A GPU holds 1/tp of its sub-stage's weights and KV. Layers are not
  re-split after step 4 (the paper's order), though comms may unbalance the stages.
"""
from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from hetis.sim.cluster import Cluster
from hetis.sim.costmodel import DeviceModel
from hetis.sim.hardware import GIB, GpuType, load_gpus
from hetis.sim.shapes import ModelShape
from hetis.sim.workloads import describe

RULE = 0.05                    # the paper's 5 %
RESERVE_FRAC = 0.1             # of every GPU's memory, never used
DEFAULT_EXPECTED_REQUESTS = 32
MAX_COMBOS = 20_000            # TP x PP combinations tried exhaustively


class PlanError(ValueError):
    """No deployment of the model fits the cluster."""


@dataclass
class Plan:
    """The chosen deployment. ``tp``/``pp`` are per stage, in the order of ``stages``: an
    int when all stages agree, else a list; ``pp`` counts a stage's sub-stages,
    ``pipeline_depth`` all of them. ``stages`` has one list per instance (all alike);
    ``primaries``/``attention_workers`` are ``{host, gpu, count}`` over all instances.
    ``cost_s`` is C: seconds of dense path per output token of a request."""
    model: str
    workload: str
    expected_requests: int
    instances: int
    primaries: list[dict]
    attention_workers: list[dict]
    tp: int | list[int]
    pp: int | list[int]
    pipeline_depth: int
    stages: list[list[dict]]
    cost_s: float
    kv_demand_gib: float
    attention_kv_gib: float            # of the demand, what the attention workers hold
    search_seconds: float = 0.0
    rejected: list[str] = field(default_factory=list)
    removals: list[dict] = field(default_factory=list)   # the 5 % rule's accepted steps

    def to_json(self) -> dict:
        """A plain dict: issue 11's ``deployment`` keys and the rest of the plan."""
        return asdict(self)


@dataclass
class _Stage:
    gpu: GpuType
    hosts: list[str]          # one entry per GPU, grouped by host: TP groups are runs

    @property
    def n(self) -> int:
        return len(self.hosts)


@dataclass
class _Config:
    """A candidate: d alike instances (stage lists), the pool, layers per stage."""
    insts: list[list[_Stage]]
    pool: list[tuple[str, str]]        # (host, gpu) of every attention worker
    layers: list[int] | None = None    # per stage, the same in every instance
    kv_pl: float = 0.0                 # KV bytes per layer kept free on an instance
    compute: float = math.inf          # step 2's C: depth x the slowest stage's compute


def _gib(nbytes: float) -> float:
    return round(nbytes / GIB, 3)


def _usable(g: GpuType) -> float:
    return g.mem_bytes * (1 - RESERVE_FRAC)


def _tally(pairs) -> list[dict]:
    """[{host, gpu, count}] from (host, gpu) pairs, in order of first appearance."""
    return [{"host": h, "gpu": g, "count": n} for (h, g), n in Counter(pairs).items()]


class _Search:
    def __init__(self, cluster: Cluster, shape: ModelShape, workload: str, requests: int):
        self.cluster, self.shape, self.R = cluster, shape, requests
        gpus = load_gpus()
        self.gpus = {k: gpus[k] for k in cluster.gpu_counts()}
        self.order = sorted(self.gpus, key=lambda k: (  # weakest first
            self.gpus[k].fp16_tflops, self.gpus[k].mem_bw_gbs, k))
        self.models = {k: DeviceModel(g) for k, g in self.gpus.items()}
        w = describe(workload)
        p, o = w["prompt"]["mean"], w["output"]["mean"]
        self.mean_len, self.tok_per_req = p + o, (p + o) / o
        self.kv_demand = requests * self.mean_len * shape.kv_bytes_per_token
        bpp = shape.bytes_per_param
        self.layer_w, self.act = shape.layer_weight_bytes, shape.hidden * bpp
        self.embed_w, self.head_w = shape.vocab * shape.hidden * bpp, shape.lm_head_params * bpp
        self.rejected: list[str] = []

    def extras(self, first: bool, last: bool) -> float:
        """Embedding on the first sub-stage, LM head on the last (once if tied and one)."""
        if first and last and self.shape.tied_embeddings:
            return self.embed_w
        return (self.embed_w if first else 0.0) + (self.head_w if last else 0.0)

    # ------------------------------------------------------------- (1) instances
    def split(self, d: int) -> _Config:
        """d alike instances, each with 1/d of every type's GPUs (few hosts each)."""
        slots = {k: self.cluster.slots(k) for k in self.order}
        return _Config([[_Stage(self.gpus[k], f[i * len(f) // d:(i + 1) * len(f) // d])
                         for k, f in slots.items()] for i in range(d)], [])

    # ------------------------------------------------------------ (2) layer split
    def map_layers(self, cfg: _Config) -> bool:
        """Layers per stage minimising the slowest stage's compute, within memory."""
        inst, d = cfg.insts[0], len(cfg.insts)
        pool = sum(_usable(self.gpus[g]) for _, g in cfg.pool)
        cfg.kv_pl = max(0.0, self.kv_demand - pool) / d / self.shape.num_layers
        active = list(range(len(inst)))
        while active:
            seqs = self.R / (d * len(active))
            b = seqs * self.tok_per_req
            load, step, cap, cnt = {}, {}, {}, dict.fromkeys(active, 0)
            for j, i in enumerate(active):
                st, m = inst[i], self.models[inst[i].gpu.key]
                last = j == len(active) - 1
                step[i] = m.dense_time(self.shape, b, 1, tp=st.n)
                load[i] = m.lm_head_time(self.shape, seqs, tp=st.n) if last else 0.0
                free = st.n * _usable(st.gpu) - self.extras(j == 0, last)
                cap[i] = int(free // (self.layer_w + cfg.kv_pl)) if free > 0 else 0
            for _ in range(self.shape.num_layers):
                open_ = [i for i in active if cnt[i] < cap[i]]
                if not open_:
                    return False
                best = min(open_, key=lambda i: (load[i] + step[i], -i))
                cnt[best] += 1
                load[best] += step[best]
            if cnt[active[0]] and cnt[active[-1]]:    # the extras' holders have layers
                cfg.layers = [cnt.get(i, 0) for i in range(len(inst))]
                cfg.compute = sum(1 for i in active if cnt[i]) * max(load.values())
                return True
            active.remove(active[0] if not cnt[active[0]] else active[-1])
        return False

    # ------------------------------------------------------------- (3) 5 % rule
    def without(self, cfg: _Config, key: str) -> _Config | None:
        """One GPU of ``key`` out of every instance, from the host with fewest of it."""
        insts, pool = [], list(cfg.pool)
        for inst in cfg.insts:
            i = next((k for k, s in enumerate(inst) if s.gpu.key == key), None)
            if i is None or sum(s.n for s in inst) == 1:
                return None
            hosts = inst[i].hosts
            host = min(reversed(hosts), key=hosts.count)    # fewest; the last such host
            at = max(k for k, h in enumerate(hosts) if h == host)
            pool.append((host, key))
            kept = [_Stage(inst[i].gpu, hosts[:at] + hosts[at + 1:])]
            insts.append(inst[:i] + (kept if kept[0].n else []) + inst[i + 1:])
        return _Config(insts, pool)

    def drop_empty(self, cfg: _Config) -> _Config:
        """Stages with no layers hold no weights: their GPUs join the pool."""
        while cfg.layers and not all(cfg.layers):
            pool = cfg.pool + [(h, s.gpu.key) for inst in cfg.insts
                               for s, m in zip(inst, cfg.layers, strict=True) if not m
                               for h in s.hosts]
            cfg = _Config([[s for s, m in zip(inst, cfg.layers, strict=True) if m]
                           for inst in cfg.insts], pool)
            self.map_layers(cfg)
        return cfg

    def remove(self, cfg: _Config, d: int, removals: list[dict]) -> _Config:
        for key in self.order:
            while (cand := self.without(cfg, key)) is not None:
                if not self.map_layers(cand):
                    self.rejected.append(f"instances={d}: keep {key}: without one the rest "
                                         "cannot hold the weights and KV")
                    break
                ratio = cand.compute / cfg.compute
                if ratio > 1 + RULE:
                    self.rejected.append(f"instances={d}: keep {key}: without one C grows "
                                         f"x{ratio:.3f} (> {1 + RULE:.2f})")
                    break
                removals.append({"gpu": key, "count": d, "ratio": round(ratio, 4)})
                cfg = cand
        return self.drop_empty(cfg)

    # ---------------------------------------------------------------- (4) TP x PP
    def options(self, st: _Stage, m: int) -> list[tuple[int, int]]:
        """(tp, pp): tp divides the heads, as many sub-stages as GPUs and layers allow."""
        return [(tp, min(m, st.n // tp)) for tp in range(1, st.n + 1)
                if self.shape.num_heads % tp == 0]

    def gpu_loads(self, cfg: _Config, inst: list[_Stage], i: int, tp: int,
                  pp: int) -> list[float]:
        """Bytes on one GPU of each sub-stage: 1/tp of its layers, their KV, its extras."""
        q, r = divmod(cfg.layers[i], pp)
        return [((q + (j < r)) * (self.layer_w + cfg.kv_pl) + self.extras(
            i == 0 and j == 0, i == len(inst) - 1 and j == pp - 1)) / tp for j in range(pp)]

    def stage_time(self, cfg: _Config, inst: list[_Stage], i: int, tp: int, pp: int,
                   depth: int) -> float:
        """The slowest sub-stage of stage i split tp x pp (inf when a GPU overflows).
        Every stage has layers here (step 3 emptied the others)."""
        st, m, net = inst[i], self.models[inst[i].gpu.key], self.cluster.link_between
        if max(self.gpu_loads(cfg, inst, i, tp, pp)) > _usable(st.gpu):
            return math.inf
        seqs = self.R / (len(cfg.insts) * depth)
        b, g = seqs * self.tok_per_req, st.gpu
        q, r = divmod(cfg.layers[i], pp)
        worst = 0.0
        for j in range(pp):
            n_l, grp, nxt = q + (j < r), st.hosts[j * tp:(j + 1) * tp], st.hosts[(j + 1) * tp:]
            t = m.dense_time(self.shape, b, n_l, tp=tp)
            if tp > 1:
                t += 2 * n_l * net(g, grp, g, grp).allreduce_time(b * self.act, tp)
            if j < pp - 1:
                t += net(g, grp, g, nxt[:tp]).time(b * self.act)
            elif i < len(inst) - 1:
                t += net(g, st.hosts, inst[i + 1].gpu, inst[i + 1].hosts).time(b * self.act)
            else:
                t += m.lm_head_time(self.shape, seqs, tp=tp)
            worst = max(worst, t)
        return worst

    def cost(self, cfg: _Config, choice: tuple, cache: dict) -> float:
        """C of a (tp, pp) per stage: depth x the slowest sub-stage of any instance."""
        depth = sum(pp for _, pp in choice)
        worst = 0.0
        for n, inst in enumerate(cfg.insts):
            for i, (tp, pp) in enumerate(choice):
                key = (n, i, tp, pp, depth)
                if key not in cache:
                    cache[key] = self.stage_time(cfg, inst, i, tp, pp, depth)
                worst = max(worst, cache[key])
        return depth * worst

    def best_choice(self, cfg: _Config, d: int) -> tuple[tuple, float]:
        """Every combination of per-stage splits, or coordinate descent past MAX_COMBOS."""
        cache: dict = {}
        opts = [self.options(st, m) for st, m in zip(cfg.insts[0], cfg.layers, strict=True)]
        n = math.prod(len(o) for o in opts)
        if n <= MAX_COMBOS:
            best = min(itertools.product(*opts), key=lambda c: self.cost(cfg, c, cache))
        else:   # from the widest TP of every stage
            best, improved = tuple(o[-1] for o in opts), True
            while improved:
                improved = False
                for i, o in enumerate(opts):
                    top = min((best[:i] + (x,) + best[i + 1:] for x in o),
                              key=lambda c: self.cost(cfg, c, cache))
                    if self.cost(cfg, top, cache) < self.cost(cfg, best, cache):
                        best, improved = top, True
        c = self.cost(cfg, best, cache)
        what = ", ".join(f"{st.gpu.key} tp{t}xpp{p}"
                         for st, (t, p) in zip(cfg.insts[0], best, strict=True))
        how = "all" if n <= MAX_COMBOS else "coordinate descent over"
        self.rejected.append(f"instances={d}: TP x PP: {how} {n} combinations, best C "
                             f"{c * 1e3:.3f} ms with {what}")
        return best, c

    def trim(self, cfg: _Config, choice: tuple, d: int) -> _Config:
        """GPUs outside a stage's tp x pp grid hold nothing: attention workers."""
        pairs = [list(zip(inst, choice, strict=True)) for inst in cfg.insts]
        insts = [[_Stage(st.gpu, st.hosts[:tp * pp]) for st, (tp, pp) in p] for p in pairs]
        extra = [(h, st.gpu.key) for p in pairs for st, (tp, pp) in p for h in st.hosts[tp * pp:]]
        if extra:
            self.rejected.append(f"instances={d}: {len(extra)} GPU(s) outside the tp x pp "
                                 "grid become attention workers")
        return _Config(insts, cfg.pool + extra, cfg.layers, cfg.kv_pl, cfg.compute)

    # ------------------------------------------------------------------ reporting
    def no_room(self, cfg: _Config) -> str:
        """Why an instance of ``cfg`` cannot hold its layers."""
        inst, d, w = cfg.insts[0], len(cfg.insts), self.shape.weight_bytes
        usable, kv = sum(st.n * _usable(st.gpu) for st in inst), cfg.kv_pl * self.shape.num_layers
        what = " + ".join(f"{st.n}x {st.gpu.key}" for st in inst)
        if usable < w + kv:
            return (f"{what} per instance hold {_gib(usable)} GiB usable < {_gib(w)} GiB "
                    f"weights + {_gib(kv)} GiB KV ({self.R / d:g} requests)")
        return f"{what}: the layers do not split into the stages' memory ({_gib(usable)} GiB)"

    def nowhere(self, workload: str) -> str:
        counts = self.cluster.gpu_counts()
        total = sum(self.gpus[k].mem_bytes * n for k, n in counts.items())
        usable, w = total * (1 - RESERVE_FRAC), self.shape.weight_bytes
        how = "" if w + self.kv_demand > usable else " (enough in total, not layer by layer)"
        return (f"{self.shape.name} fits nowhere on this cluster{how}: {_gib(w)} GiB of "
                f"weights + {_gib(self.kv_demand)} GiB of KV ({self.R} requests x "
                f"{self.mean_len:.0f} tokens of {workload}) against {_gib(usable)} GiB usable "
                f"on {sum(counts.values())} GPUs ({_gib(total)} GiB, {RESERVE_FRAC:.0%} "
                "never used); " + "; ".join(self.rejected))

    def stages(self, cfg: _Config, choice: tuple, depth: int) -> list[list[dict]]:
        return [[{"gpu": st.gpu.key, "count": st.n, "layers": m, "tp": tp, "pp": pp,
                  "hosts": _tally((h, st.gpu.key) for h in st.hosts),
                  "weights_gib": _gib(sum(self.gpu_loads(cfg, inst, i, tp, pp)) * tp
                                      - m * cfg.kv_pl),
                  "kv_gib": _gib(m * cfg.kv_pl), "mem_gib": _gib(st.n * st.gpu.mem_bytes),
                  "max_gpu_gib": _gib(max(self.gpu_loads(cfg, inst, i, tp, pp))),
                  "time_s": self.stage_time(cfg, inst, i, tp, pp, depth)}
                 for i, (st, m, (tp, pp)) in enumerate(zip(inst, cfg.layers, choice, strict=True))]
                for inst in cfg.insts]


def _try(s: _Search, d: int, rule: bool = True):
    """Steps (1)-(4) for d instances (``rule=False``: not (3)): (C, d, cfg, choice, removals)."""
    cfg, removals = s.split(d), []
    if s.map_layers(cfg):
        cfg = s.remove(cfg, d, removals) if rule else s.drop_empty(cfg)
    if cfg.layers is None:
        s.rejected.append(f"instances={d}: " + s.no_room(cfg))
        return None
    choice, c = s.best_choice(cfg, d)
    if c == math.inf:
        s.rejected.append(f"instances={d}: no TP x PP split fits every GPU's memory")
        return None
    return c, d, s.trim(cfg, choice, d), choice, removals


def _uniform(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def plan(cluster: Cluster, shape: ModelShape, workload: str,
         expected_requests: int | None = None, rule: bool = True) -> Plan:
    """The §4.1 search over ``cluster`` for ``shape`` under ``workload`` (module
    docstring); :class:`PlanError`, with the numbers, when none fits. ``rule=False``: no 5 %
    rule (systems without attention workers, hetis/sim/systems.py)."""
    t0 = time.perf_counter()
    R = DEFAULT_EXPECTED_REQUESTS if expected_requests is None else expected_requests
    if isinstance(R, bool) or not isinstance(R, int) or R < 1:
        raise ValueError(f"expected_requests: must be an integer >= 1 (got {R!r})")
    s = _Search(cluster, shape, workload, R)
    gcd = math.gcd(*cluster.gpu_counts().values())
    results = [r for d in range(1, gcd + 1) if gcd % d == 0 if (r := _try(s, d, rule)) is not None]
    if not results:
        raise PlanError(s.nowhere(workload))
    c, d, cfg, choice, removals = min(results, key=lambda r: (r[0], r[1]))
    s.rejected += [f"instances={o[1]}: C {o[0] * 1e3:.3f} ms > {c * 1e3:.3f} ms of "
                   f"instances={d}" for o in results if o[1] != d]
    depth = sum(pp for _, pp in choice)
    pool = sum(_usable(s.gpus[g]) for _, g in cfg.pool)
    return Plan(
        model=shape.name, workload=workload, expected_requests=R, instances=d,
        primaries=_tally((h, st.gpu.key) for inst in cfg.insts for st in inst for h in st.hosts),
        attention_workers=_tally(cfg.pool), tp=_uniform([tp for tp, _ in choice]),
        pp=_uniform([pp for _, pp in choice]), pipeline_depth=depth,
        stages=s.stages(cfg, choice, depth), cost_s=c, kv_demand_gib=_gib(s.kv_demand),
        attention_kv_gib=_gib(min(pool, s.kv_demand)),
        search_seconds=time.perf_counter() - t0, rejected=s.rejected, removals=removals)
