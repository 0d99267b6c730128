"""The mesh across two hosts, on a real (shaped) link: placement, throughput, recovery.

    sudo .venv/bin/python -m bench.hosts [--requests N] [--output-len N]

Host A (this network namespace: Redis, router, dense worker) and host B (a network
namespace: two attention workers) are joined by a veth link shaped with tc tbf
(tests/helpers/hosts.py). For each link rate (1 Gbit/s, 100 Mbit/s), with the
dispatcher's own policy (hetis), then with round-robin:

- the link the dense worker measured to each attention worker (latency, bandwidth);
- the share of head groups placed on host B (sampled from the router's status
  while the workload runs) and the output tok/s (``hetis bench``: N requests of 256
  prompt tokens, all at once);
- the dispatcher's predicted attention time per step of the slowest host-B worker
  (its load: compute + latency + transfer) against the measured wait on the
  attention workers per step (the router's step breakdown, same window).

The same with round-robin dispatch, which puts groups on host B whatever the link
costs, so the prediction is compared on real traffic.

Then, at 1 Gbit/s with round-robin (so host B holds groups of every stream), 8
streams run and B is cut off: the time from the cut to the first token any
stream gets after it (the dense worker's --peer-timeout, 10 s per lost channel,
then the recompute).

Writes bench/results/hosts.{json,png}. Needs root (network namespaces).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import threading
import time

import grpc

from bench.run_all import OUT, bench
from hetis.client import Client
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc
from tests.helpers.hosts import Across, HostPair, available


def _sample(target: str, stop: threading.Event, out: list) -> None:
    with Client(target, retries=0) as c:
        while not stop.is_set():
            try:
                out.append((time.monotonic(), c.cluster_status(timeout=5)))
            except Exception:  # noqa: BLE001 - a busy router: the next sample
                pass
            time.sleep(0.25)


def placement_run(rate: str, requests: int, output_len: int, policy: str = "hetis") -> dict:
    hosts = HostPair(rate=rate)
    try:
        mesh = Across(hosts, policy=policy)
        try:
            with Client(mesh.target) as c:
                st0 = c.cluster_status()
            samples, stop = [], threading.Event()
            th = threading.Thread(target=_sample, args=(mesh.target, stop, samples))
            th.start()
            r = bench(["--target", mesh.target, "--threads", "1", "--num-prompts", str(requests),
                       "--input-len-min", "256", "--input-len-max", "256", "--random-output-len",
                       str(output_len), "--ignore-eos", "--seed", "0"])
            stop.set()
            th.join(30)
            links = [line for c in mesh.local.children if c.name == "dense-0"
                     for line in c.tail(200).splitlines() if "is backend" in line]
        finally:
            mesh.stop()
    finally:
        hosts.close()
    on_b = total = 0
    loads = []
    for _, st in samples:
        for w in st["workers"]:
            g = sum(len(x["groups"]) for x in w["resident"])
            total += g
            if w["kind"] == "attention":
                on_b += g
        b = [w["load"] for w in st["workers"] if w["kind"] == "attention" and w["resident"]]
        if b:
            loads.append(max(b))
    busy = [s for _, s in samples if s["running"]]
    first, last = (busy[0], busy[-1]) if len(busy) > 1 else (st0, st0)
    dsteps = last["steps"]["steps"] - first["steps"]["steps"]
    dwait = last["steps"]["exchange_wait_s"] - first["steps"]["exchange_wait_s"]
    return {"rate": rate, "policy": policy, "links": links, "output_tok_s": r["output_throughput"],
            "completed": r["completed"], "groups_on_host_b_share": on_b / max(total, 1),
            "predicted_remote_step_s": sum(loads) / len(loads) if loads else 0.0,
            "measured_exchange_wait_per_step_s": dwait / max(dsteps, 1), "samples": len(samples)}


def recovery_run(llm_prompt_ids: list[list[int]], output_len: int = 96) -> dict:
    hosts = HostPair(rate="1gbit")
    try:
        mesh = Across(hosts, policy="round-robin")
        try:
            times: list[float] = []
            lock, started = threading.Lock(), threading.Barrier(len(llm_prompt_ids) + 1)
            with grpc.insecure_channel(mesh.target) as ch:
                stub = generation_pb2_grpc.GenerationStub(ch)

                def one(ids):
                    req = pb.GenerateRequest(sampling=pb.SamplingParams(
                        temperature=0, max_tokens=output_len, ignore_eos=True))
                    req.prompt_token_ids.ids.extend(ids)
                    for n, _chunk in enumerate(stub.Generate(req, timeout=600)):
                        with lock:
                            times.append(time.monotonic())
                        if n == 2:
                            started.wait(300)
                threads = [threading.Thread(target=one, args=(p,)) for p in llm_prompt_ids]
                for t in threads:
                    t.start()
                started.wait(300)
                time.sleep(1.0)
                hosts.cut()
                cut = time.monotonic()
                for t in threads:
                    t.join(600)
            after = sorted(t for t in times if t > cut + 0.5)  # tokens in flight at the cut excluded
            return {"streams": len(llm_prompt_ids), "cut_to_first_recovered_token_s":
                    (after[0] - cut) if after else None,
                    "cut_to_last_token_s": (after[-1] - cut) if after else None}
        finally:
            mesh.stop()
    finally:
        hosts.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hosts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args(argv)
    why = available()
    if why:
        raise SystemExit(f"bench.hosts: {why}")
    import torch

    from hetis.model.loader import load_meta
    _, tok = load_meta(None)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{cpu}, {mp.cpu_count()} cores, torch CPU capability "
                      f"{torch.backends.cpu.get_cpu_capability()}",
           "runs": [placement_run(rate, args.requests, args.output_len, policy)
                    for policy in ("hetis", "round-robin") for rate in ("1gbit", "100mbit")]}
    base = tok.encode("The history of the printing press begins in the fifteenth century, when ")
    res["recovery"] = recovery_run([base[: 4 + i] for i in range(8)])
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "hosts.json", "w") as f:
        json.dump(res, f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"{r['rate']}\n{r['policy']}" for r in res["runs"]]
    a.bar(names, [100 * r["groups_on_host_b_share"] for r in res["runs"]])
    a.set_ylabel("head groups on host B, %")
    a.set_title("placement by link rate and policy")
    b.bar(names, [r["output_tok_s"] for r in res["runs"]])
    b.set_ylabel("output tok/s")
    b.set_title(f"{args.requests} requests, 256 prompt / {args.output_len} output tokens")
    fig.suptitle(res["machine"])
    fig.tight_layout()
    fig.savefig(OUT / "hosts.png", dpi=120)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
