"""`hetis allocate FILE [--mode M] [--json]`: divide a GPU pool described in YAML.

The file format is in hetis/allocator/spec.py and docs/allocator.md. Exit codes:
0 success, 2 a bad file (the message names the line and field), 1 a solver failure.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import modes

MODES = list(modes.MODES)


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("allocate", help="divide a heterogeneous GPU pool among tenants (OEF)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", metavar="FILE", help="YAML with gpus and tenants ('-' reads stdin)")
    ap.add_argument("--mode", choices=MODES, default="cooperative")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    ap.add_argument("--time-limit", type=float, default=2.0, metavar="S",
                    help="seconds for the cooperative solve, Pareto stages included (default 2)")
    ap.set_defaults(func=run)
    return ap


def result(problem, alloc) -> dict:
    from .problem import FAIR_TOL, ef_slack, equal_share_values, si_slack, utilities
    u, si, ef = utilities(problem, alloc.x), si_slack(problem, alloc.x), ef_slack(problem, alloc.x)
    base = equal_share_values(problem)
    return {
        "mode": alloc.mode,
        "gpus": dict(zip(problem.gpu_types, map(float, problem.capacity))),
        "allocation": alloc.as_dict(problem),
        "efficiency": round(float(u.sum()), 6),
        "solve_seconds": round(alloc.solve_seconds, 6),
        **alloc.outcome(),
        "tenants": {t: {"utility": round(float(u[i]), 6), "equal_share_utility": round(float(base[i]), 6),
                        "si_slack": round(float(si[i]), 6), "ef_slack": round(float(ef[i]), 6),
                        "sharing_incentive": bool(si[i] >= -FAIR_TOL), "envy_free": bool(ef[i] >= -FAIR_TOL)}
                    for i, t in enumerate(problem.tenants)},
    }


def _table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    types = list(out["gpus"])
    gap = "" if out["optimality_gap"] is None else f", gap {100 * out['optimality_gap']:.2f} %"
    if out.get("implementable") is not None:    # multi-GPU jobs (jobs.py)
        gap += (f", a mix of feasible rounds, SI fraction {out['si_fraction']:.3f}" if out["implementable"]
                else ", job-blind: the rounds may not reach it")
    table = Table(title=f"{out['mode']} allocation — efficiency {out['efficiency']:.3f} ({out['stage']}{gap})")
    table.add_column("tenant")
    for g in types:
        table.add_column(f"{g} ({out['gpus'][g]:g})", justify="right")
    for col in ("utility", "SI", "EF"):
        table.add_column(col, justify="right")
    for t, row in out["allocation"].items():
        info = out["tenants"][t]
        table.add_row(t, *[f"{row[g]:.3f}" for g in types], f"{info['utility']:.3f}",
                      "yes" if info["sharing_incentive"] else "NO", "yes" if info["envy_free"] else "NO")
    Console().print(table)


def run(args) -> int:
    from .spec import SpecError, load
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file).read()
    except OSError as e:
        print(f"hetis allocate: {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        problem, specs = load(text, "<stdin>" if args.file == "-" else args.file)
    except (SpecError, ValueError) as e:
        print(f"hetis allocate: {e}", file=sys.stderr)
        return 2
    try:
        alloc = modes.allocate(problem, args.mode, time_limit=args.time_limit,
                               jobs={t.name: t.jobs for t in specs if t.jobs})
    except RuntimeError as e:
        print(f"hetis allocate: {e}", file=sys.stderr)
        return 1
    out = result(problem, alloc)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _table(out)
    return 0


def main(argv=None) -> int:
    """Stand-alone entry, the same as `hetis allocate`: ``python -m hetis.allocator.cli allocate FILE``."""
    ap = argparse.ArgumentParser(prog="hetis")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
