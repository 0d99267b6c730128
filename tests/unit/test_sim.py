"""`hetis simulate`: the project's own engine on a virtual clock. Deterministic for a seed,
driven by the real scheduler and dispatcher (a knob of theirs changes the result),
memory from the cost model, clear errors."""
from __future__ import annotations

import json

import pytest

from hetis.cli import main
from hetis.sim.shapes import model_shape
from hetis.sim.simulator import AttentionPool, Deployment, simulate
from hetis.sim.workloads import make_requests

L7 = model_shape("llama-2-7b")
DEP = Deployment("a100-80g", 1, attention=(AttentionPool("rtx3090", 2, "ethernet-100g"),))


def run(seed=0, n=40, rate=8.0, dep=DEP, policy="hetis", **kw) -> dict:
    reqs = make_requests("sharegpt", rate, n, seed, max_model_len=2048)
    return simulate(dep, L7, reqs, policy=policy, max_model_len=2048, **kw).summary()


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert a == b
    assert a["duration_s"] != c["duration_s"]
    assert a["completed"] == 40 and a["unfinished"] == 0


def test_the_real_scheduler_decides():
    """max_num_seqs is the scheduler's knob: one sequence at a time serialises everything."""
    batched, serial = run(max_num_seqs=64), run(max_num_seqs=1)
    assert serial["steps"] > batched["steps"]
    assert serial["duration_s"] > 2 * batched["duration_s"]
    assert serial["ttft_p95_s"] > batched["ttft_p95_s"]


def test_the_real_dispatcher_places_the_head_groups():
    local, rr = run(policy="local-only"), run(policy="round-robin")
    assert local["attention_busy_s"][1:] == [0.0, 0.0]
    assert all(t > 0 for t in rr["attention_busy_s"])
    # a 3090 behind Ethernet is slower at attention than the A100 itself: dealing groups
    # to it blindly costs time per output token
    assert rr["tpot_p50_s"] > local["tpot_p50_s"]


def test_kv_capacity_comes_from_memory_left_after_the_weights():
    s = run(n=5)
    primary, *workers = s["kv_blocks_per_device"]
    assert workers[0] == workers[1] > 0
    # 80 GB less 13.5 GB of weights against 24 GB with none: the A100 holds more, but
    # not 80/24 times more
    assert workers[0] < primary < 80 / 24 * workers[0]
    assert s["kv_blocks"] == primary + sum(workers)


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="gpu: unknown 'a200'"):
        run(dep=Deployment("a200"))
    with pytest.raises(ValueError, match="does not fit on 1x rtx3090"):
        simulate(Deployment("rtx3090"), model_shape("llama-2-70b"),
                 make_requests("sharegpt", 1.0, 2, 0))


def test_cli_json_and_usage_errors(capsys):
    assert main(["simulate", "--model", "llama-2-7b", "--primary", "a100-80g:1", "--attention",
                 "rtx3090:2@ethernet-25g", "--num-requests", "10", "--rate", "4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["completed"] == 10 and s["model"] == "llama-2-7b" and len(s["kv_blocks_per_device"]) == 3
    with pytest.raises(SystemExit) as e:  # argparse: the flag's own type check
        main(["simulate", "--primary", "a100-80g:0"])
    assert e.value.code == 2
    assert main(["simulate", "--primary", "h900:2", "--num-requests", "2"]) == 2
    assert "gpu: unknown 'h900'" in capsys.readouterr().err


def test_a_measured_device_is_charged_exactly_its_coefficients():
    """One request on a measured device: the virtual duration is the prefill step plus one
    decode step per further token, each the device's own formula (what bench.sim_vs_real
    relies on when it predicts this machine)."""
    from hetis.sim.measured import MeasuredDevice
    from hetis.sim.workloads import Request
    dev = MeasuredDevice(d0=0.01, d1=0.002, p1=0.001, a_tok=1e-5, a_grp=1e-4, p_attn=0.0,
                         kv_tokens=1 << 16, e0=0.0005, e1=0.0001)
    prompt, out = 20, 5
    res = simulate(Deployment("cpu"), L7, [Request("r", 0.0, prompt, out)], policy="local-only",
                   measured={"cpu": dev}, max_model_len=2048)
    G = L7.num_groups
    step0 = dev.d0 + dev.e0

    def per_seq(n):
        return (dev.d1 - dev.p1 + dev.e1) * n
    prefill = step0 + dev.p1 * prompt + per_seq(1)
    decodes = sum(step0 + dev.p1 + per_seq(1) + dev.a_tok * G * (prompt + k + 1) + dev.a_grp * G
                  for k in range(out - 1))
    assert res.steps == out
    assert res.duration_s == pytest.approx(prefill + decodes, rel=1e-9)


def test_hetis_plan_cli(capsys, tmp_path):
    """`hetis plan`: the paper's testbed file gives P100 attention workers; a bad file exits 2
    naming its line and field; a model too big for the cluster exits 1 saying so."""
    assert main(["plan", "examples/testbed.yaml", "--json", "--search-only"]) == 0
    p = json.loads(capsys.readouterr().out)
    dep = p["deployment"]
    assert [w["gpu"] for w in dep["attention_workers"]] == ["p100-12g"]
    assert {w["gpu"] for w in dep["primaries"]} >= {"a100-80g"}
    assert p["search_seconds"] < 15 and dep["instances"] >= 1 and "tp" in dep and "pp" in dep
    bad = tmp_path / "c.yaml"
    bad.write_text("hosts:\n  - {name: a, gpus: {a200: 2}}\n")
    assert main(["plan", str(bad)]) == 2
    assert "c.yaml:2: hosts[0].gpus: unknown GPU 'a200'" in capsys.readouterr().err
    small = tmp_path / "small.yaml"
    small.write_text("hosts:\n  - {name: a, gpus: {t4: 1}}\n")
    assert main(["plan", str(small), "--model", "llama-2-70b", "--search-only"]) == 1
    assert "llama-2-70b" in capsys.readouterr().err


def test_max_rate_meets_the_slos_and_a_tighter_slo_lowers_it():
    """24 HumanEval requests of Llama-2-7B on one A100: all at once they meet a loose SLO
    (inf); a TPOT SLO between the trickle's and the full batch's binds at a finite rate,
    the summary there meets it; a TPOT below the trickle's is never met."""
    import math

    from hetis.sim.simulator import max_rate, meets
    kw = dict(num_requests=24, seed=0, slo_ttft=0.5, policy="local-only", max_model_len=2048)
    loose, _ = max_rate(DEP, L7, "humaneval", slo_tpot=1.0, **kw)
    mid, s_mid = max_rate(DEP, L7, "humaneval", slo_tpot=0.013, **kw)
    never, s_never = max_rate(DEP, L7, "humaneval", slo_tpot=0.005, **kw)
    assert loose == math.inf
    assert 0 < mid < math.inf and meets(s_mid, 0.5, 0.013)
    assert (never, s_never) == (0.0, None)


def test_re_dispatch_runs_in_the_simulation():
    """The real re-dispatch policy on the virtual clock: compute rebalancing moves head
    groups between the A100s and the 3090s; optimistic admission (kv_headroom) on a 70B
    model, whose weights leave the primary little KV, changes what runs; all complete."""
    dep = Deployment("a100-80g", 2, attention=(AttentionPool("rtx3090", 2, "ethernet-100g"),))
    reqs = make_requests("sharegpt", 50.0, 120, 0, max_model_len=4096)
    shape = model_shape("llama-2-70b")
    full = simulate(dep, shape, reqs, max_model_len=4096).summary()
    lean = simulate(dep, shape, reqs, max_model_len=4096, kv_headroom=0).summary()
    assert lean["completed"] == full["completed"] == 120
    assert full["migrations"] > 0 and lean["migrations"] > 0
    assert lean["duration_s"] != full["duration_s"]
