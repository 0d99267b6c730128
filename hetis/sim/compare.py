"""``hetis plan``'s comparison: the sustainable rate of every system (hetis/sim/systems.py)
under the SLOs, side by side, and the plot of request rate against P95 TTFT and TPOT.

Default SLOs per workload (:data:`SLOS`): ours, in the spirit of DistServe's
per-application SLOs (chat answers start within seconds, summaries may take longer
to start; 150 ms per output token is faster than people read). The Hetis paper does
not publish its SLOs; pass ``--slo-ttft``/``--slo-tpot`` for your own.

Every system's search (:func:`hetis.sim.simulator.search_rate`) runs in its own
process (one per core): the simulations are independent and single-threaded.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor

from hetis.sim.cluster import Cluster
from hetis.sim.shapes import ModelShape
from hetis.sim.systems import SYSTEMS, System, system_max_rate, systems_for

SLOS = {"sharegpt": (2.5, 0.15), "humaneval": (1.5, 0.15), "longbench": (15.0, 0.15)}


def default_slos(workload: str) -> tuple[float, float]:
    return SLOS.get(workload, SLOS["sharegpt"])


def _one(args) -> dict:
    name, system, shape, cluster, workload, n, seed, ttft, tpot, rel_tol, steady = args
    trace = []
    rate, s = system_max_rate(system, shape, cluster, workload, n, seed, ttft, tpot,
                              rel_tol=rel_tol, progress=lambda r, s: trace.append((r, s)),
                              steady=steady)
    at = s or {}
    return {"max_rate": rate, "ttft_p95": at.get("ttft_p95_s"), "tpot_p95": at.get("tpot_p95_s"),
            "output_tok_s": at.get("output_tok_s"), "kv_blocks": system.kv_blocks(shape),
            "preemptions": at.get("preemptions"), "deployment": system.describe(),
            "trace": [{"rate": r, "ttft_p95": x["ttft_p95_s"], "tpot_p95": x["tpot_p95_s"],
                       "unfinished": x["unfinished"]} for r, x in trace if math.isfinite(r)]}


def compare(cluster: Cluster, shape: ModelShape, workload: str, expected_requests: int | None,
            num_requests: int, seed: int, slo_ttft: float, slo_tpot: float,
            rel_tol: float = 0.02, workers: int | None = None, progress=None,
            steady: float = 0.0, systems: tuple[str, ...] | None = None) -> dict:
    """{system: its max rate under the SLOs and the figures there, or ``{"error": why}``}.
    ``progress(name)`` is called as each system finishes. ``steady``: the SLOs hold over
    the steady-state window (:meth:`hetis.sim.simulator.SimResult.summary`);
    ``systems``: only these (default all)."""
    found = systems_for(cluster, shape, workload, expected_requests)
    out: dict[str, dict] = {k: {"error": v} for k, v in found.items() if isinstance(v, str)}
    if systems is not None:
        found = {k: v for k, v in found.items() if k in systems}
        out = {k: v for k, v in out.items() if k in systems}
    jobs = [(k, v, shape, cluster, workload, num_requests, seed, slo_ttft, slo_tpot, rel_tol,
             steady) for k, v in found.items() if isinstance(v, System)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        results = map(_one, jobs)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_one, jobs)
    for (k, *_), r in zip(jobs, results, strict=True):
        out[k] = r
        if progress:
            progress(k)
    if workers > 1:
        pool.shutdown()
    return {k: out[k] for k in SYSTEMS if k in out}


def plot(systems: dict, path: str, title: str, slo_ttft: float, slo_tpot: float) -> None:
    """Request rate against P95 TTFT and P95 TPOT per system (the searches' own runs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, slo, label in ((axes[0], "ttft_p95", slo_ttft, "P95 TTFT (s)"),
                                (axes[1], "tpot_p95", slo_tpot * 1e3, "P95 TPOT (ms)")):
        for name, r in systems.items():
            pts = sorted((p["rate"], p[key] * (1e3 if key == "tpot_p95" else 1))
                         for p in r.get("trace", []) if not p["unfinished"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{name} (max {r['max_rate']:.2f})")
        ax.axhline(slo, color="grey", linestyle="--", label="SLO")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 3 * slo)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
