"""`hetis plan`'s systems side by side on the paper's testbed, and the search's time by
cluster size.

    .venv/bin/python -m bench.plan_systems [--num-requests 100] [--models ...] [--workloads ...]

For every model (llama-2-13b, opt-30b, llama-2-70b) and workload (sharegpt, humaneval,
longbench) on examples/testbed.yaml (4x A100-80GB, 2x2 RTX 3090, 4x P100-12GB, 100
Gb/s): every system's sustainable rate under the workload's default SLOs
(hetis/sim/compare.py), its P95 TTFT/TPOT there and its KV blocks, with Hetis's ratios
beside the paper's (2.25x Splitwise, 1.33x HexGen, KV blocks up to 1.87x). Then the
§4.1 search's seconds on 5 GPU types x 4..32 GPUs each (the paper: 15 s at 5 x 32).
Writes bench/results/plan_systems.{json,png}. Virtual-clock results: deterministic for
a seed; the wall time (tens of minutes on 2 cores) is the simulator's.
"""
from __future__ import annotations

import argparse
import json
import math
import time

from tqdm import tqdm

from bench.run_all import OUT
from hetis.sim.cluster import load_cluster, parse_cluster
from hetis.sim.compare import compare, default_slos
from hetis.sim.planner import plan
from hetis.sim.shapes import model_shape

PAPER = {"splitwise": 2.25, "hexgen": 1.33, "kv_blocks": 1.87}
MODELS = ("llama-2-70b", "opt-30b", "llama-2-13b")   # the paper's headline model first
WORKLOADS = ("sharegpt", "humaneval", "longbench")


def ratio(a, b):
    if not a or not b or math.isinf(a) or math.isinf(b):
        return None
    return round(a / b, 3)


def search_times(sizes=(4, 8, 16, 32)) -> list[dict]:
    out = []
    for n in sizes:
        per_host = min(n, 8)
        hosts = [f"  - {{name: {t}-{h}, gpus: {{{t}: {per_host}}}}}"
                 for t in ("h100", "a100-80g", "a40", "l4", "t4") for h in range(n // per_host)]
        c = parse_cluster("hosts:\n" + "\n".join(hosts) +
                          "\nnetwork: {inter_host_gbps: 100, intra_host: nvlink}")
        p = plan(c, model_shape("llama-2-70b"), "sharegpt", 256)
        out.append({"gpus_per_type": n, "gpus": 5 * n, "search_s": round(p.search_seconds, 4),
                    "instances": p.instances})
        print(f"search: 5 types x {n} GPUs: {p.search_seconds:.3f} s ({p.instances} instances)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rel-tol", type=float, default=0.05)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other cases of the existing plan_systems.json (same "
                         "--num-requests, --seed and --rel-tol): run the table in pieces")
    args = ap.parse_args(argv)
    cluster = load_cluster("examples/testbed.yaml")
    rows = []
    if args.merge and (OUT / "plan_systems.json").exists():
        old = json.loads((OUT / "plan_systems.json").read_text())
        same = all(old.get(k) == getattr(args, k) for k in ("num_requests", "seed", "rel_tol"))
        if not same:
            raise SystemExit("--merge: plan_systems.json was run with other --num-requests, "
                             "--seed or --rel-tol")
        mine = {(m, w) for m in args.models for w in args.workloads}
        rows = [r for r in old["rows"] if (r["model"], r["workload"]) not in mine]
    t0 = time.perf_counter()
    cases = [(m, w) for m in args.models for w in args.workloads]
    for m, w in tqdm(cases, desc="model x workload", unit="case"):
        ttft, tpot = default_slos(w)
        t_case = time.perf_counter()
        s = compare(cluster, model_shape(m), w, None, args.num_requests, args.seed, ttft, tpot,
                    rel_tol=args.rel_tol)
        h = s.get("hetis", {})
        row = {"model": m, "workload": w, "slo_ttft_s": ttft, "slo_tpot_s": tpot,
               "systems": s,
               "hetis_vs": {k: ratio(h.get("max_rate"), s[k].get("max_rate"))
                            for k in ("hexgen", "splitwise", "vllm")},
               "kv_blocks_vs": {k: ratio(h.get("kv_blocks"), s[k].get("kv_blocks"))
                                for k in ("hexgen", "splitwise", "vllm")},
               "wall_s": round(time.perf_counter() - t_case, 1)}
        rows.append(row)
        rows.sort(key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99,
                                 WORKLOADS.index(r["workload"]) if r["workload"] in WORKLOADS else 99))
        cells = "  ".join(f"{k} {v['max_rate']:.2f}" if "max_rate" in v else f"{k} -"
                          for k, v in s.items())
        tqdm.write(f"{m} {w}: max req/s {cells}; hetis/hexgen {row['hetis_vs']['hexgen']}, "
                   f"hetis/splitwise {row['hetis_vs']['splitwise']}, KV vs hexgen "
                   f"{row['kv_blocks_vs']['hexgen']}")
        write(args, rows, [], t0, complete=False)
    done = {(r["model"], r["workload"]) for r in rows}
    write(args, rows, search_times(), t0,
          complete=all((m, w) in done for m in MODELS for w in WORKLOADS))
    return 0


def write(args, rows, search, t0, complete: bool) -> None:
    """The JSON and the plot so far: a run cut short still leaves its finished cases."""
    result = {"cluster": "examples/testbed.yaml", "num_requests": args.num_requests,
              "seed": args.seed, "rel_tol": args.rel_tol, "paper": PAPER, "rows": rows,
              "complete": complete, "search": search,
              "wall_s": round(time.perf_counter() - t0, 1)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "plan_systems.json").write_text(json.dumps(result, indent=2))
    draw(result, OUT / "plan_systems.png")
    tqdm.write(f"wrote {OUT / 'plan_systems.json'} and plan_systems.png")


def draw(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    names = ("hetis", "hexgen", "splitwise", "vllm")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.2
    for k, name in enumerate(names):
        vals = [r["systems"].get(name, {}).get("max_rate") or 0 for r in rows]
        vals = [0 if math.isinf(v) else v for v in vals]
        xs = [i + (k - 1.5) * width for i in range(len(rows))]
        ax.bar(xs, vals, width, label=name)
        for x, r in zip(xs, rows, strict=True):
            if "error" in r["systems"].get(name, {}):
                ax.text(x, 0.12, "cannot\ndeploy", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(rows)), [f"{r['model']}\n{r['workload']}" for r in rows], fontsize=7)
    ax.set_ylabel("max request rate under SLOs (req/s, log)")
    ax.set_yscale("log")  # 0.5 to 272 req/s across the models
    ax.set_ylim(bottom=0.1)
    ax.set_title("testbed: 4x A100-80G, 2x2 RTX 3090, 4x P100 (simulated)")
    ax.legend()
    s = result["search"] or [{"gpus": 0, "search_s": float("nan")}]
    ax2.plot([x["gpus"] for x in s], [x["search_s"] for x in s], marker="o")
    ax2.axhline(15, color="grey", linestyle="--", label="paper: 15 s")
    ax2.set_xlabel("GPUs (5 types)")
    ax2.set_ylabel("search seconds")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
