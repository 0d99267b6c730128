"""`hetis bench --engine local` for real: the in-process engine, and the transformers baseline."""
from __future__ import annotations

import json

import pytest


def test_cli_local_engine(tmp_path, capsys):
    from hetis.cli import main
    out, png = tmp_path / "tmp.json", tmp_path / "tmp.png"
    rc = main(["bench", "--engine", "local", "--num-prompts", "4", "--random-input-len", "16",
               "--random-output-len", "4", "--ignore-eos", "--threads", "1", "--disable-tqdm",
               "--goodput", "ttft:100000", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["completed"] == 4 and d["failed"] == 0 and d["total_output_tokens"] == 16
    assert d["total_input_tokens"] == 64 and d["target"] == "engine"
    for k in ("request_throughput", "output_throughput", "total_token_throughput",
              "request_goodput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "std_ttft_ms",
              "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "p99_e2el_ms"):
        assert d[k] > 0, k
    assert d["good_requests"] == 4
    assert len(d["requests"]) == 4 and all(len(r["itl_ms"]) == 3 for r in d["requests"])
    assert png.stat().st_size > 10_000
    assert "Output token throughput" in capsys.readouterr().out


def test_baseline_hf_fields(tmp_path, monkeypatch, hf_model):
    """--baseline hf through the CLI on 2 tiny requests (the reference model is the
    session's, so the ~40 s GGUF read is paid once for the suite)."""
    from hetis.bench import hf_baseline
    from hetis.cli import main
    monkeypatch.setattr(hf_baseline, "load_hf_model", lambda model=None: hf_model)
    out = tmp_path / "b.json"
    rc = main(["bench", "--engine", "local", "--num-prompts", "2", "--random-input-len", "8",
               "--random-output-len", "3", "--threads", "1", "--disable-tqdm",
               "--baseline", "hf", "--baseline-batch", "2", "--out", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    b = d["baseline"]
    assert b["name"] == "hf-transformers" and b["total_output_tokens"] == 6 == d["total_output_tokens"]
    assert b["output_throughput"] > 0 and b["num_batches"] == 1 and d["ignore_eos"] is True
    assert d["speedup_vs_baseline"] == pytest.approx(d["output_throughput"] / b["output_throughput"])
