"""Allocator benchmark: solve time per mode and scale, efficiency gain over Gavel's
max-min fairness with performance on instances drawn from the Gavel data.

    .venv/bin/python -m bench.allocator_bench [--quick]

Writes bench/results/allocator.json and bench/results/allocator.png.
Instances: each tenant runs one Gavel job type (per-GPU throughput on v100, p100, k80),
weight 1, 2 or 4. For 8 GPU types, 5 synthetic types are added to every Gavel job
type as fixed random mixtures of its three measured speeds (x 0.8-1.2); with
--distinct they are drawn per tenant instead, so every profile is different (the
worst case for the cooperative LP, which merges identical tenants).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from hetis.allocator import gavel
from hetis.allocator.baselines import max_min_perf
from hetis.allocator.modes import MODES, allocate, solver
from hetis.allocator.noncooperative import noncooperative
from hetis.allocator.problem import Problem, efficiency, groups

OUT = pathlib.Path(__file__).resolve().parent / "results"


def catalogue_prices() -> dict[str, float]:
    """Public exchange rates: each type's geometric-mean speedup over k80 in the catalogue
    (independent of any tenant's report, so the exchange stays strategy-proof)."""
    logs = {g: [] for g in ("v100", "p100", "k80")}
    for j in gavel.jobs():
        t = j["throughput_steps_per_s"]
        if t["k80"] > 0:
            for g in logs:
                logs[g].append(np.log(t[g] / t["k80"]))
    return {g: float(np.exp(np.mean(v))) for g, v in logs.items()}


def _extra(rng, thr: list[float], k: int) -> list[float]:
    return [float(rng.dirichlet(np.ones(3)) @ thr * rng.uniform(0.8, 1.2)) for _ in range(k)]


def instance(rng, n: int, m: int, gpus_per_tenant: float = 2.0, caps: bool = False,
             prices: dict | None = None, distinct: bool = False) -> Problem:
    jobs = gavel.jobs()
    types = ["v100", "p100", "k80"] + [f"x{k}" for k in range(m - 3)]
    fixed = np.random.default_rng(0)
    synth = [_extra(fixed, [j["throughput_steps_per_s"][g] for g in types[:3]], m - 3) for j in jobs]
    tenants = []
    for i in range(n):
        k = rng.integers(len(jobs))
        j = jobs[k]
        thr = [j["throughput_steps_per_s"][g] / j["scale_factor"] for g in types[:3]]
        extra = _extra(rng, thr, m - 3) if distinct else [v / j["scale_factor"] for v in synth[k]]
        tenants.append({"name": f"t{i}", "throughput": dict(zip(types, thr + extra)),
                        "weight": float(rng.choice([1, 2, 4])),
                        "max_gpus": float(rng.integers(1, 9)) if caps and rng.random() < 0.3 else None})
    share = rng.dirichlet(np.ones(m) * 2)
    gpus = {g: max(1, int(round(gpus_per_tenant * n * s))) for g, s in zip(types, share)}
    return Problem.build(gpus, tenants, prices)


def jobs_instance(rng, n: int, m: int, frac: float = 0.3) -> tuple[Problem, dict]:
    """`instance` where a fraction of the tenants run 1-3 jobs of 1, 2, 4 or 8 GPUs (at
    least one of more than 1), capped at their jobs' total: (problem, jobs)."""
    p = instance(rng, n, m)
    jobs, caps = {}, p.caps.copy()
    for i, t in enumerate(p.tenants):
        if rng.random() < frac:
            js = [(f"j{k}", int(rng.choice([1, 2, 4, 8]))) for k in range(int(rng.integers(1, 4)))]
            if max(g for _, g in js) > 1:
                jobs[t] = js
                caps[i] = sum(g for _, g in js)
    return Problem(p.gpu_types, p.capacity, p.tenants, p.weights, p.throughput, caps, p.prices), jobs


def constrained_times(quick: bool) -> list[dict]:
    """Cooperative (2 s budget) where caps and multi-GPU jobs make it harder: 30 % of the
    tenants capped at 1-8 GPUs, and 30 % with multi-GPU jobs (x must be a mix of feasible
    rounds, docs/allocator.md "Rounds"), x 8 types; efficiency against the job-blind
    stage-1 optimum without a budget."""
    from hetis.allocator.cooperative import cooperative
    rows = []
    cases = [("caps", n) for n in (200, 1000)] + [("jobs", n) for n in ((30, 100) if quick else (30, 100, 300, 1000))]
    for kind, n in track(cases, description="caps and jobs"):
        rng = np.random.default_rng(n * 10 + 8)
        p, jobs = (instance(rng, n, 8, caps=True), None) if kind == "caps" else jobs_instance(rng, n, 8)
        t0 = time.perf_counter()
        a = cooperative(p, jobs=jobs)
        seconds = time.perf_counter() - t0
        ref = cooperative(p, pareto=False, time_limit=120.0)
        rows.append({"kind": kind, "tenants": n, "gpu_types": 8, "seconds": seconds, "job_tenants": len(jobs or {}),
                     "efficiency": efficiency(p, a.x), "blind_fair_efficiency": ref.info.get("fair_efficiency"),
                     "groups": a.info.get("groups"), "caps_dropped": a.info.get("caps_dropped"),
                     "implementable_reason": a.info.get("implementable_reason"), **a.outcome()})
    return rows


def solve_times(quick: bool) -> list[dict]:
    """Every mode at 10, 100, 1000, 5000 tenants x 3 and 8 types (catalogue profiles, which
    merge), and cooperative on all-distinct profiles; cooperative with its default 2 s
    budget, the stage it ended in and its gap to the SI+EF optimum."""
    rows = []
    sizes = [(n, m, False) for n in (10, 100, 1000, 5000) for m in (3, 8)]
    sizes += [(n, 8, True) for n in ((100, 200) if quick else (100, 200, 1000))]
    for n, m, distinct in track(sizes, description="solve times"):
        p = instance(np.random.default_rng(n * 10 + m), n, m, distinct=distinct)
        for mode in MODES:
            if distinct and mode != "cooperative":
                continue
            t0 = time.perf_counter()
            a = allocate(p, mode)
            row = {"tenants": n, "gpu_types": m, "mode": mode, "seconds": time.perf_counter() - t0,
                   "efficiency": efficiency(p, a.x), "distinct_profiles": len(groups(p)[1]),
                   "all_distinct": distinct, **a.outcome()}
            if mode == "cooperative":
                row.update(fair_efficiency=a.info.get("fair_efficiency"), stage1_seconds=a.info["stage1_seconds"],
                           lp_solves=a.info["lp_solves"])
            rows.append(row)
    return rows


def gains(quick: bool) -> dict:
    prices = catalogue_prices()
    runs = 20 if quick else 100
    per_mode: dict[str, list[float]] = {}
    vs_lp: dict[str, list[float]] = {}
    stages: dict[str, int] = {}
    loss: list[float] = []
    rng = np.random.default_rng(42)
    for _ in track(range(runs), description="efficiency vs max-min"):
        n = int(rng.choice([4, 8, 16, 32]))
        p = instance(rng, n, 3, gpus_per_tenant=float(rng.uniform(0.5, 4)), caps=bool(rng.random() < 0.5),
                     prices=prices)
        ref = efficiency(p, solver("max-min")(p).x)
        ref_lp = efficiency(p, max_min_perf(p, tie_break=False).x)
        for mode in MODES:
            if mode == "partial-allocation" and n > 16:
                continue
            a = solver(mode)(p)
            eff = efficiency(p, a.x)
            per_mode.setdefault(mode, []).append(100 * (eff / ref - 1))
            vs_lp.setdefault(mode, []).append(100 * (eff / ref_lp - 1))
            if mode == "cooperative":   # stage 1 alone: the SI+EF optimum, Pareto efficient or not
                fair = a.info["fair_efficiency"]
                stages[a.info["stage"]] = stages.get(a.info["stage"], 0) + 1
                loss.append(100 * (1 - eff / fair))
                per_mode.setdefault("cooperative stage 1 (SI+EF, not PE)", []).append(100 * (fair / ref - 1))
                vs_lp.setdefault("cooperative stage 1 (SI+EF, not PE)", []).append(100 * (fair / ref_lp - 1))
        uniform = noncooperative(Problem(p.gpu_types, p.capacity, p.tenants, p.weights, p.throughput, p.caps))
        per_mode.setdefault("noncooperative (1:1)", []).append(100 * (efficiency(p, uniform.x) / ref - 1))
    summary = lambda d: {k: {"mean": statistics.fmean(v), "best": max(v), "worst": min(v), "n": len(v)}  # noqa: E731
                         for k, v in d.items()}
    return {"prices": prices, "instances": runs, "gain_pct": summary(per_mode),
            "gain_pct_vs_untiebroken_max_min": summary(vs_lp), "cooperative_stages": stages,
            "cooperative_pe_cost_pct": {"mean": statistics.fmean(loss), "worst": max(loss),
                                        "instances_with_cost": sum(v > 1e-7 for v in loss)}}


def plot(times: list[dict], eff: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in MODES:
        for m, style in ((3, "-o"), (8, "--s")):
            pts = [(r["tenants"], r["seconds"]) for r in times
                   if r["mode"] == mode and r["gpu_types"] == m and not r["all_distinct"]]
            if pts:
                a.plot(*zip(*pts), style, label=f"{mode}, {m} types")
    a.set(xscale="log", yscale="log", xlabel="tenants", ylabel="solve time (s)", title="Solve time")
    a.legend(fontsize=6)
    import textwrap
    keys = list(eff["gain_pct"])
    names = [textwrap.fill(k, 16) for k in keys]
    b.bar(names, [eff["gain_pct"][k]["mean"] for k in keys], label="mean")
    b.scatter(names, [eff["gain_pct"][k]["best"] for k in keys], color="k", zorder=3, label="best")
    b.axhline(0, color="grey", lw=0.8)
    b.set(ylabel="efficiency vs max-min (%)", title="Gain over max-min fairness with performance")
    b.tick_params(axis="x", rotation=35, labelsize=7)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer instances, PA only at 10 tenants")
    args = ap.parse_args(argv)
    load0 = float(open("/proc/loadavg").read().split()[0])
    times = solve_times(args.quick)
    hard = constrained_times(args.quick)
    eff = gains(args.quick)
    OUT.mkdir(parents=True, exist_ok=True)
    import os
    machine = {"date": time.strftime("%Y-%m-%d"), "loadavg_1min_at_start": load0, "cpus": os.cpu_count(),
               "avx512_bf16": "avx512_bf16" in open("/proc/cpuinfo").read()}
    (OUT / "allocator.json").write_text(json.dumps({"machine": machine, "solve_times": times,
                                                               "constrained": hard, "efficiency": eff},
                                                   indent=2))
    plot(times, eff, OUT / "allocator.png")
    console = Console()
    t = Table(title="Solve time (s); cooperative: stage, gap to the SI+EF optimum")
    for c in ("tenants", "types", "distinct", *MODES, "stage", "gap %"):
        t.add_column(c, justify="right")
    for n, m, d in sorted({(r["tenants"], r["gpu_types"], r["all_distinct"]) for r in times}):
        rs = {r["mode"]: r for r in times if (r["tenants"], r["gpu_types"], r["all_distinct"]) == (n, m, d)}
        co = rs["cooperative"]
        t.add_row(str(n), str(m), str(co["distinct_profiles"]),
                  *[f"{rs[k]['seconds']:.3f}" if k in rs else "-" for k in MODES], f"{co['stage']} ({co['solver']})",
                  "?" if co["optimality_gap"] is None else f"{100 * co['optimality_gap']:.2f}")
    console.print(t)
    h = Table(title="Cooperative with caps or multi-GPU jobs, 8 types (2 s budget)")
    for c in ("kind", "tenants", "job tenants", "s", "stage (solver)", "implementable", "SI fraction",
              "eff / job-blind optimum"):
        h.add_column(c, justify="right")
    for r in hard:
        rel = "?" if not r["blind_fair_efficiency"] else f"{r['efficiency'] / r['blind_fair_efficiency']:.4f}"
        h.add_row(r["kind"], str(r["tenants"]), str(r["job_tenants"]), f"{r['seconds']:.2f}",
                  f"{r['stage']} ({r['solver']})", str(r["implementable"]), str(r["si_fraction"]), rel)
    console.print(h)
    for key, what in (("gain_pct", "max-min with performance, efficiency tie-break"),
                      ("gain_pct_vs_untiebroken_max_min", "max-min with performance, first LP vertex (Gavel-like)")):
        g = Table(title=f"Efficiency gain vs {what}, {eff['instances']} Gavel instances (%)")
        for c in ("mode", "mean", "best", "worst", "instances"):
            g.add_column(c, justify="right")
        for k, v in eff[key].items():
            g.add_row(k, f"{v['mean']:+.2f}", f"{v['best']:+.2f}", f"{v['worst']:+.2f}", str(v["n"]))
        console.print(g)
    console.print(f"cooperative stages: {eff['cooperative_stages']}; efficiency given up for Pareto "
                  f"efficiency (% of the SI+EF optimum): {eff['cooperative_pe_cost_pct']}")
    console.print(f"wrote {OUT / 'allocator.json'} and {OUT / 'allocator.png'}")


if __name__ == "__main__":
    main()
