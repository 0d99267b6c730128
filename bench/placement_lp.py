"""Admission placement: the dispatcher's greedy against the paper's min-max program.

    .venv/bin/python -m bench.placement_lp [--trials 20]

The paper places the head groups of the requests that arrive together by solving
a min-max problem: minimise the slowest device's predicted attention time subject
to each device's free KV. We place them greedily, one group at a time, on the
device that would finish soonest (hetis/engine/dispatcher.py). This runs both on
the same situations and compares the makespan each reaches (evaluated with the
dispatcher's own cost model, ``Device.time``) and the time each takes.

Situations: a dense device (local, fast) and 2 or 4 attention workers (remote,
each 1.5-4x slower per token, with a link latency), some requests already
running (random placement), and a burst of 1, 4, 16 or 64 new requests of
64-1024 tokens arriving together; free KV is tight enough that memory binds.
The program is a mixed-integer one (HiGHS through ``scipy.optimize.milp``):
binary x[r, g, d] (group g of request r on device d), binary y[d] (device d
holds any group this step: it pays its latency), continuous t; minimise t with
each device's time <= t, its free blocks respected, each group placed once.
Writes bench/results/placement_lp.json.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from bench.run_all import OUT
from hetis.engine.block_manager import cdiv
from hetis.engine.dispatcher import Device, Dispatcher
from hetis.engine.sampling import SamplingParams
from hetis.engine.sequence import Sequence, Status

G, L, BLOCK, ROW_BYTES = 3, 30, 16, 2 * 5 * 64 * 2  # SmolLM2's groups, layers; bf16 rows


def situation(rng: random.Random, n_attn: int, burst: int):
    devices = [Device("dense", 0, cost_per_token=2e-9, cost_per_group=2e-6)]
    for i in range(n_attn):
        devices.append(Device(f"attn-{i}", 0, cost_per_token=2e-9 * rng.uniform(1.5, 4.0),
                              cost_per_group=2e-6, remote=True, latency=rng.uniform(5e-5, 3e-4),
                              bandwidth=rng.choice([1.25e9, 1.25e10])))
    running = []
    for i in range(rng.randint(4, 24)):
        s = Sequence(f"run{i}", [1] * rng.randint(64, 1024), SamplingParams(max_tokens=128))
        s.status, s.placement = Status.RUNNING, [rng.randrange(len(devices)) for _ in range(G)]
        running.append(s)
    new = [Sequence(f"new{i}", [1] * rng.randint(64, 1024), SamplingParams(max_tokens=128))
           for i in range(burst)]
    # capacity: what is running plus about 1.3x the burst's need, spread unevenly
    used = [0] * len(devices)
    for s in running:
        for d in s.placement:
            used[d] += cdiv(s.num_tokens + 128, BLOCK)
    need = sum(cdiv(s.num_tokens + 128, BLOCK) * G for s in new)
    weights = [rng.uniform(0.5, 1.5) for _ in devices]
    for d, dev in enumerate(devices):
        dev.capacity_blocks = used[d] + int(1.3 * need * weights[d] / sum(weights)) + 64
    return devices, running, new


def dispatcher(devices, running) -> Dispatcher:
    d = Dispatcher(devices, G, L, BLOCK, 4096, ROW_BYTES, policy="hetis")
    d.get_running = lambda: running
    return d


def makespan(disp: Dispatcher, placements: dict[int, list[int]], new) -> float:
    tokens, groups, _ = disp.state()
    for s in new:
        for d in placements[s.seq_id]:
            tokens[d] += s.num_tokens
            groups[d] += 1
    return max(disp.predicted_times(tokens, groups))


def greedy(devices, running, new):
    live = list(running)
    disp = dispatcher(devices, live)
    out = {}
    t0 = time.perf_counter()
    for s in new:
        p = disp.place(s)
        if p is None:
            return None, time.perf_counter() - t0
        out[s.seq_id] = p
        s.placement, s.status = p, Status.RUNNING
        live.append(s)
    dt = time.perf_counter() - t0
    for s in new:
        s.placement, s.status = None, Status.WAITING
    return out, dt


def program(devices, running, new, time_limit: float = 10.0):
    disp = dispatcher(devices, running)
    tokens, groups, reserved = disp.state()
    D, R = len(devices), len(new)
    nx = R * G * D
    nv = nx + D + 1                       # x, y, t
    ix = lambda r, g, d: (r * G + g) * D + d  # noqa: E731
    c = np.zeros(nv)
    c[-1] = 1.0
    A = lil_matrix((D + D + R * G + nx, nv))
    lo, hi = [], []
    row = 0
    for d, dev in enumerate(devices):     # time_d <= t
        base = L * (dev.cost_per_token * tokens[d] + dev.cost_per_group * groups[d])
        if dev.remote:
            base += L * groups[d] * ROW_BYTES / dev.bandwidth
            if groups[d]:
                base += L * dev.latency
            else:
                A[row, nx + d] = L * dev.latency
        for r, s in enumerate(new):
            per = L * (dev.cost_per_token * s.num_tokens + dev.cost_per_group
                       + (ROW_BYTES / dev.bandwidth if dev.remote else 0.0))
            for g in range(G):
                A[row, ix(r, g, d)] = per
        A[row, -1] = -1.0
        lo.append(-np.inf)
        hi.append(-base)
        row += 1
    for d, dev in enumerate(devices):     # free KV
        for r, s in enumerate(new):
            for g in range(G):
                A[row, ix(r, g, d)] = cdiv(disp.expected_len(s), BLOCK)
        lo.append(-np.inf)
        hi.append(dev.capacity_blocks - reserved[d])
        row += 1
    for r in range(R):                    # each group once
        for g in range(G):
            for d in range(D):
                A[row, ix(r, g, d)] = 1.0
            lo.append(1.0)
            hi.append(1.0)
            row += 1
    for r in range(R):                    # x <= y
        for g in range(G):
            for d in range(D):
                A[row, ix(r, g, d)] = 1.0
                A[row, nx + d] = -1.0
                lo.append(-np.inf)
                hi.append(0.0)
                row += 1
    integrality = np.r_[np.ones(nx + D), 0]
    bounds = Bounds(np.zeros(nv), np.r_[np.ones(nx + D), np.inf])
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(A.tocsr(), lo, hi), integrality=integrality,
               bounds=bounds, options={"time_limit": time_limit, "mip_rel_gap": 1e-4})
    dt = time.perf_counter() - t0
    if res.x is None:
        return None, dt, res.status
    x = res.x[:nx].reshape(R, G, D)
    return {s.seq_id: [int(np.argmax(x[r, g])) for g in range(G)]
            for r, s in enumerate(new)}, dt, res.status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.placement_lp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=10.0, help="per program, seconds")
    args = ap.parse_args(argv)
    rows = []
    for n_attn in (2, 4):
        for burst in (1, 4, 16, 64):
            ratios, tg, tl, optimal, infeasible = [], [], [], 0, 0
            for trial in range(args.trials):
                rng = random.Random(1000 * n_attn + 10 * burst + trial)
                devices, running, new = situation(rng, n_attn, burst)
                gp, gdt = greedy(devices, running, new)
                lp, ldt, status = program(devices, running, new, args.time_limit)
                if gp is None or lp is None:
                    infeasible += 1
                    continue
                disp = dispatcher(devices, running)
                ratios.append(makespan(disp, gp, new) / makespan(disp, lp, new))
                tg.append(gdt)
                tl.append(ldt)
                optimal += status == 0
            r = {"attention_workers": n_attn, "burst": burst, "trials": len(ratios),
                 "skipped_no_room": infeasible, "lp_optimal": optimal,
                 "greedy_over_lp_mean": float(np.mean(ratios)) if ratios else None,
                 "greedy_over_lp_max": float(np.max(ratios)) if ratios else None,
                 "greedy_ms_mean": 1e3 * float(np.mean(tg)) if tg else None,
                 "lp_ms_mean": 1e3 * float(np.mean(tl)) if tl else None}
            rows.append(r)
            print(json.dumps(r), flush=True)
    OUT.mkdir(exist_ok=True)
    with open(OUT / "placement_lp.json", "w") as f:
        json.dump({"rows": rows, "note": "makespan ratio > 1: the program's placement is faster"},
                  f, indent=2)
    print(f"wrote {OUT / 'placement_lp.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
