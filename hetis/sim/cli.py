"""`hetis simulate`: its flags and the command (the simulator is hetis/sim/simulator.py)."""
from __future__ import annotations

import argparse
import json
import sys

from hetis.defaults import POLICIES
from hetis.mesh.flags import nonneg_int, positive_int, positive_rate



def _steady(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v < 0.5:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 0.5) (got {text!r})")
    return v

def _gpu_count(s: str) -> tuple[str, int]:
    gpu, _, n = s.partition(":")
    try:
        count = int(n) if n else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be GPU[:COUNT], e.g. a100-80g:4 (got {s})") from None
    if not gpu or count < 1:
        raise argparse.ArgumentTypeError(f"must be GPU[:COUNT] with COUNT >= 1 (got {s})")
    return gpu, count


def _pool(s: str):
    from hetis.sim.simulator import AttentionPool
    head, _, lk = s.partition("@")
    gpu, count = _gpu_count(head)
    return AttentionPool(gpu, count, lk or "ethernet-100g")


def add_plan_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="the paper's deployment search for a mixed cluster",
                       description="Search the dense path's deployment (instances, a pipeline "
                       "stage per GPU type, the layer split, the 5%% rule, TP x PP per stage) "
                       "for CLUSTER.yaml; the GPUs left out become attention workers "
                       "(docs/simulate.md).")
    p.add_argument("cluster", metavar="CLUSTER.yaml",
                   help="hosts and their GPUs, and the network (docs/simulate.md)")
    p.add_argument("--model", default="llama-2-70b", metavar="M",
                   help="a built-in model or a Hugging Face config.json (default %(default)s)")
    p.add_argument("--workload", default="sharegpt", metavar="W",
                   help="sharegpt, humaneval, longbench (default %(default)s)")
    p.add_argument("--requests", type=positive_int, default=None, metavar="N",
                   help="expected concurrent requests (default: the planner's, 32)")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="S",
                   help="P95 TTFT SLO in seconds for the comparison (default per workload: "
                   "sharegpt 2.5, humaneval 1.5, longbench 15)")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="S",
                   help="P95 TPOT SLO in seconds (default 0.15)")
    p.add_argument("--num-requests", type=positive_int, default=200, metavar="N",
                   help="simulated requests per rate in the comparison (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload and arrivals (default 0)")
    p.add_argument("--steady", type=_steady, default=0.0, metavar="FRAC",
                   help="hold the SLOs over the steady-state window only: leave out the first "
                        "and last FRAC of the requests by arrival (warm-up, cool-down); "
                        "default 0 (every request)")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="draw request rate vs P95 TTFT and TPOT per system to FILE (PNG)")
    p.add_argument("--search-only", action="store_true",
                   help="only the search: no simulation of the systems side by side")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> int:
    from hetis.bench.cli import UsageError
    from hetis.sim.cluster import load_cluster
    from hetis.sim.planner import PlanError, plan
    from hetis.sim.shapes import model_shape
    try:
        cluster = load_cluster(args.cluster)
        shape = model_shape(args.model)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    from hetis.sim.compare import default_slos
    ttft, tpot = default_slos(args.workload)
    ttft = ttft if args.slo_ttft is None else args.slo_ttft
    tpot = tpot if args.slo_tpot is None else args.slo_tpot
    for flag, v in (("--slo-ttft", ttft), ("--slo-tpot", tpot)):
        if not v > 0:
            raise UsageError(f"{flag}: must be > 0 seconds (got {v})")
    try:
        p = plan(cluster, shape, args.workload, args.requests)
    except PlanError as e:
        print(f"hetis plan: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # an unknown workload
        raise UsageError(str(e)) from None
    systems = None if args.search_only else _compare(args, cluster, shape, ttft, tpot)
    if args.json:  # issue 11's shape: the deployment under its own key
        flat = p.to_json()
        top = {k: flat.pop(k) for k in ("model", "workload", "expected_requests", "search_seconds")
               if k in flat}
        out = {**top, "deployment": flat}
        if systems is not None:
            out.update(slo_ttft_s=ttft, slo_tpot_s=tpot, num_requests=args.num_requests,
                       seed=args.seed, steady=args.steady, systems=systems)
        print(json.dumps(out, indent=2))
        return 0

    def groups(rows):
        return ", ".join(f"{r['count']}x {r['gpu']} ({r['host']})" for r in rows) or "none"
    print(f"{shape.name}, {args.workload}, {p.expected_requests} requests in flight: "
          f"searched in {p.search_seconds * 1e3:.0f} ms")
    print(f"primaries:         {groups(p.primaries)}")
    print(f"attention workers: {groups(p.attention_workers)}")
    print(f"{p.instances} instance(s); tp {p.tp}, pp {p.pp}; dense cost C = "
          f"{p.cost_s * 1e3:.1f} ms per output token")
    for i, stages in enumerate(p.stages):
        for st in stages:
            print(f"  instance {i}: {st['count']}x {st['gpu']}: {st['layers']} layers, tp {st['tp']}, "
                  f"pp {st['pp']}, {st['time_s'] * 1e3:.1f} ms")
    if systems is not None:
        print(f"\nside by side ({args.workload}, {args.num_requests} requests a rate, seed "
              f"{args.seed}; SLOs P95 TTFT <= {ttft} s, P95 TPOT <= {tpot * 1e3:.0f} ms):")
        print(f"  {'system':<10} {'max req/s':>9} {'TTFT p95':>9} {'TPOT p95':>9} {'KV blocks':>10}"
              "  deployment")
        for name, r in systems.items():
            if "error" in r:
                print(f"  {name:<10} {'-':>9} {'':>9} {'':>9} {'':>10}  cannot deploy: {r['error']}")
                continue
            at = (f"{r['ttft_p95']:>8.2f}s {r['tpot_p95'] * 1e3:>7.1f}ms" if r["ttft_p95"] is not None
                  else f"{'-':>9} {'-':>9}")
            print(f"  {name:<10} {r['max_rate']:>9.2f} {at} {r['kv_blocks']:>10}  {r['deployment']}")
    return 0


def _compare(args, cluster, shape, ttft: float, tpot: float) -> dict:
    """Every system's max rate under the SLOs (hetis/sim/compare.py), with a bar and --plot."""
    from tqdm import tqdm

    from hetis.sim.compare import compare, plot
    with tqdm(total=4, desc="simulate systems", unit="system", disable=args.json,
              file=sys.stderr) as bar:
        systems = compare(cluster, shape, args.workload, args.requests, args.num_requests,
                          args.seed, ttft, tpot, progress=lambda _: bar.update(),
                          steady=args.steady)
    if args.plot:
        plot(systems, args.plot, f"{shape.name}, {args.workload}: {args.cluster}", ttft, tpot)
    return systems


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("simulate", help="simulate a deployment on GPUs you do not have",
                       description="Run a workload through the project's own scheduler and "
                       "dispatcher on a virtual clock, with step times from a roofline cost "
                       "model of the GPUs and links (hetis/sim; docs/simulate.md).")
    p.add_argument("--model", default="llama-2-70b", metavar="M",
                   help="llama-2-7b, llama-2-13b, llama-2-70b, opt-30b, opt-2.7b, or a Hugging "
                   "Face config.json (default %(default)s)")
    p.add_argument("--primary", type=_gpu_count, default=("a100-80g", 4), metavar="GPU[:N]",
                   help="the primary instance: N GPUs of one type, tensor parallel "
                   "(default a100-80g:4)")
    p.add_argument("--intra-link", default="nvlink", metavar="LINK",
                   help="between the primary's GPUs: nvlink, pcie3, pcie4, pcie5 (default nvlink)")
    p.add_argument("--attention", type=_pool, action="append", default=[], metavar="GPU[:N][@LINK]",
                   help="attention workers: N GPUs of a type behind LINK to the primary "
                   "(default link ethernet-100g); repeat for several types")
    p.add_argument("--policy", choices=POLICIES, default="hetis",
                   help="head dispatch policy (default %(default)s)")
    p.add_argument("--workload", default="sharegpt", metavar="W",
                   help="sharegpt, humaneval, longbench (default %(default)s)")
    p.add_argument("--rate", type=positive_rate, default=1.0, metavar="R",
                   help="Poisson arrivals, requests per second; inf: all at once (default 1)")
    p.add_argument("--num-requests", type=positive_int, default=200, metavar="N")
    p.add_argument("--seed", type=int, default=0, help="workload and arrivals (default 0)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, metavar="N")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=4096, metavar="N")
    p.add_argument("--max-model-len", type=positive_int, default=4096, metavar="N")
    p.add_argument("--kv-headroom", type=nonneg_int, default=None, metavar="TOKENS",
                   help="re-dispatch: admit reserving current KV + TOKENS per group and move "
                   "head groups when a device runs short (default: full reservation)")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="S",
                   help="with --slo-tpot: find the highest rate at which P95 TTFT <= S seconds "
                   "and P95 TPOT <= --slo-tpot (--rate is then ignored)")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="S",
                   help="the TPOT SLO in seconds, with --slo-ttft")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_simulate)
    return p


def _deployment(args):
    """(model shape, Deployment) from the simulate flags; ValueError names what is wrong."""
    from hetis.sim.shapes import model_shape
    from hetis.sim.simulator import Deployment
    return model_shape(args.model), Deployment(args.primary[0], args.primary[1], args.intra_link,
                                               tuple(args.attention))


def cmd_simulate(args) -> int:
    from hetis.bench.cli import UsageError
    from hetis.sim.simulator import simulate
    from hetis.sim.workloads import make_requests
    if (args.slo_ttft is None) != (args.slo_tpot is None):
        raise UsageError("--slo-ttft and --slo-tpot go together")
    if args.slo_ttft is not None:
        return _max_rate(args)
    try:
        shape, dep = _deployment(args)
        reqs = make_requests(args.workload, args.rate, args.num_requests, args.seed,
                             max_model_len=args.max_model_len)
        from tqdm import tqdm
        with tqdm(total=len(reqs), desc="simulate", unit="req", disable=args.json,
                  file=sys.stderr) as bar:
            res = simulate(dep, shape, reqs, args.policy, args.max_num_seqs,
                           args.max_num_batched_tokens, args.max_model_len, progress=bar.update,
                           kv_headroom=args.kv_headroom)
    except ValueError as e:
        raise UsageError(str(e)) from None
    s = res.summary()
    s.update(model=shape.name, workload=args.workload, rate=args.rate, seed=args.seed)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{shape.name} on {s['deployment']}; policy {s['policy']}")
    print(f"{args.workload}: {s['completed']}/{s['requests']} requests at {args.rate} req/s "
          f"in {s['duration_s']:.1f} virtual s ({s['steps']} steps)")
    print(f"output {s['output_tok_s']:.1f} tok/s; TTFT p50/p95 {s['ttft_p50_s']:.3f}/"
          f"{s['ttft_p95_s']:.3f} s; TPOT p50/p95 {s['tpot_p50_s'] * 1e3:.1f}/"
          f"{s['tpot_p95_s'] * 1e3:.1f} ms; preemptions {s['preemptions']}")
    print(f"KV blocks: {s['kv_blocks']} ({' + '.join(map(str, s['kv_blocks_per_device']))})")
    return 0


def _max_rate(args) -> int:
    from hetis.bench.cli import UsageError
    from hetis.sim.simulator import max_rate
    try:
        shape, dep = _deployment(args)
        rate, s = max_rate(dep, shape, args.workload, args.num_requests, args.seed, args.slo_ttft,
                           args.slo_tpot, args.policy, max_model_len=args.max_model_len,
                           max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           kv_headroom=args.kv_headroom)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = {"model": shape.name, "deployment": dep.describe(), "policy": args.policy,
           "workload": args.workload, "slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot,
           "max_rate": rate, "at_max_rate": s}
    if args.json:
        print(json.dumps(out, indent=2))
    elif s is None:
        print(f"{shape.name} on {dep.describe()}: misses the SLOs even at 0.125 req/s")
    else:
        print(f"{shape.name} on {dep.describe()}; policy {args.policy}; {args.workload}")
        print(f"max rate {rate:.2f} req/s with P95 TTFT <= {args.slo_ttft} s and P95 TPOT <= "
              f"{args.slo_tpot * 1e3:.0f} ms (there: TTFT {s['ttft_p95_s']:.3f} s, TPOT "
              f"{s['tpot_p95_s'] * 1e3:.1f} ms, {s['output_tok_s']:.0f} tok/s, "
              f"KV blocks {s['kv_blocks']})")
    return 0
