"""``hetis bench --baseline llama.cpp`` without llama.cpp: the missing-venv error, and the
driver's batching loop against a stand-in ``llama_cpp`` module (CI never builds llama.cpp;
the comparison itself is ``make bench-llamacpp``, a benchmark)."""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest

# A stand-in for llama-cpp-python's ctypes API, as much of it as the driver uses. Its
# "model" answers every token t with t + 1 (mod the vocabulary), and it checks what
# llama.cpp would refuse: a seq_id beyond n_seq_max, a batch beyond n_batch, positions
# that do not continue the sequence's KV stream, logits asked of a row not marked.
FAKE = '''
import ctypes, json, os
__version__ = "0.0-fake"
N_VOCAB = 50
_log = {"batches": [], "cleared": 0, "removed": []}

class _Params:
    def __init__(self, **kw):
        self.__dict__.update(kw)

def llama_backend_init(): pass
def llama_model_default_params(): return _Params(n_gpu_layers=99)
def llama_context_default_params():
    return _Params(n_ctx=0, n_batch=0, n_ubatch=0, n_seq_max=1, n_threads=0,
                   n_threads_batch=0, kv_unified=True, flash_attn_type=-1)
def llama_model_load_from_file(path, params):
    assert os.path.exists(path.decode()) and params.n_gpu_layers == 0
    return object()

class _Ctx:
    def __init__(self, p):
        self.p, self.kv, self.logits = p, {}, {}

def llama_init_from_model(model, p):
    assert p.n_ctx % p.n_seq_max == 0 and not p.kv_unified
    _log["params"] = {k: getattr(p, k) for k in ("n_ctx", "n_seq_max", "n_batch", "n_threads")}
    return _Ctx(p)
def llama_model_get_vocab(model): return "vocab"
def llama_vocab_n_tokens(vocab): return N_VOCAB
def llama_get_memory(ctx): return ctx
def llama_n_ctx(ctx): return ctx.p.n_ctx

class _Batch:
    def __init__(self, n):
        self.cap, self.n_tokens = n, 0
        self.token, self.pos, self.n_seq_id, self.logits = [0] * n, [0] * n, [0] * n, [0] * n
        self.seq_id = [[0] for _ in range(n)]

def llama_batch_init(n, embd, n_seq_max): return _Batch(n)
def llama_batch_free(b): pass

def llama_decode(ctx, b):
    assert 0 < b.n_tokens <= min(b.cap, ctx.p.n_batch)
    ctx.logits = {}
    seqs = set()
    for k in range(b.n_tokens):
        s = b.seq_id[k][0]
        assert b.n_seq_id[k] == 1 and 0 <= s < ctx.p.n_seq_max
        kv = ctx.kv.setdefault(s, [])
        assert b.pos[k] == len(kv), (s, b.pos[k], len(kv))
        kv.append(b.token[k])
        assert len(kv) * ctx.p.n_seq_max <= ctx.p.n_ctx
        seqs.add(s)
        if b.logits[k]:
            row = (ctypes.c_float * N_VOCAB)()
            row[(b.token[k] + 1) % N_VOCAB] = 1.0
            ctx.logits[k] = row
    _log["batches"].append({"n": b.n_tokens, "seqs": len(seqs)})
    return 0

def llama_get_logits_ith(ctx, k):
    return ctypes.cast(ctx.logits[k], ctypes.POINTER(ctypes.c_float))

def llama_memory_clear(mem, data):
    mem.kv.clear()
    _log["cleared"] += 1
def llama_memory_seq_rm(mem, s, p0, p1):
    assert (p0, p1) == (-1, -1)
    mem.kv.pop(s)
    _log["removed"].append(s)
    return True

class _Perf:
    t_p_eval_ms = t_eval_ms = 0.0
    n_p_eval = n_eval = 0
def llama_perf_context_reset(ctx): _log["batches"].clear()
def llama_perf_context(ctx):
    with open(os.environ["FAKE_LLAMA_LOG"], "w") as f:
        json.dump(_log, f)
    return _Perf()
def llama_print_system_info(): return b"fake"
def llama_free(ctx): pass
def llama_model_free(model): pass
'''


@pytest.fixture
def fake_llama(tmp_path, monkeypatch):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama_cpp is importable here: the stand-in would not be the one used")
    (tmp_path / "llama_cpp.py").write_text(textwrap.dedent(FAKE))
    model = tmp_path / "m.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    log = tmp_path / "fake.json"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    monkeypatch.setenv("HETIS_LLAMACPP_PYTHON", sys.executable)
    return model, log


def _no_engine(monkeypatch):
    import hetis.bench.runner as runner

    def boom(*a, **k):
        raise AssertionError("the engine ran before the llama.cpp check")
    monkeypatch.setattr(runner, "run", boom)


def test_missing_llamacpp_venv_exits_2_before_loading_anything(tmp_path, monkeypatch, capsys):
    from hetis.cli import main
    _no_engine(monkeypatch)
    monkeypatch.setenv("HETIS_LLAMACPP_PYTHON", str(tmp_path / "nope" / "bin" / "python"))
    assert main(["bench", "--engine", "local", "--baseline", "llama.cpp"]) == 2
    err = capsys.readouterr().err
    assert "make bench-llamacpp" in err and "nope" in err


def test_a_venv_without_llama_cpp_exits_2(monkeypatch, capsys):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama_cpp is importable in this environment")
    from hetis.cli import main
    _no_engine(monkeypatch)
    monkeypatch.setenv("HETIS_LLAMACPP_PYTHON", sys.executable)   # Hetis's own venv
    assert main(["bench", "--engine", "local", "--baseline", "llama.cpp"]) == 2
    err = capsys.readouterr().err
    assert "cannot import llama_cpp" in err and "make bench-llamacpp" in err


def test_llamacpp_baseline_is_greedy_only(fake_llama, monkeypatch, capsys):
    from hetis.cli import main
    _no_engine(monkeypatch)
    assert main(["bench", "--engine", "local", "--baseline", "llama.cpp",
                 "--temperature", "0.8"]) == 2
    assert "greedy" in capsys.readouterr().err


def test_driver_batches_sequences_in_slots_and_times_every_token(fake_llama):
    from hetis.bench.llamacpp_baseline import decode_rate, run_llamacpp_baseline
    from hetis.bench.workloads import BenchRequest
    model, log = fake_llama
    lens = [(5, 3), (40, 7), (1, 1), (17, 4), (9, 6)]
    reqs = [BenchRequest([(i * 7 + j) % 50 for j in range(p)], o) for i, (p, o) in enumerate(lens)]
    base = run_llamacpp_baseline(reqs, str(model), threads=2, n_slots=2, log=lambda m: None)
    fake = json.loads(log.read_text())
    assert fake["params"]["n_seq_max"] == 2 and fake["params"]["n_threads"] == 2
    assert fake["cleared"] == 1                          # after the warm-up: a clean cache
    assert len(fake["removed"]) == 5 and set(fake["removed"]) == {0, 1}   # slots reused
    assert max(b["seqs"] for b in fake["batches"]) == 2  # two sequences in one llama_decode
    # every prompt token and every output token but the last goes through the model once
    assert sum(b["n"] for b in fake["batches"]) == sum(p + o - 1 for p, o in lens)
    assert base["steps"] == len(fake["batches"])
    assert base["completed"] == 5 and base["failed"] == 0
    assert base["total_output_tokens"] == sum(o for _, o in lens)
    assert base["n_slots"] == base["batch_size"] == 2 and base["dtype"].startswith("Q4_1")
    assert base["output_throughput"] > 0 and decode_rate(base) > 0
    # greedy over the stand-in's logits: each token is the one before it + 1 (mod 50)
    for r, toks in zip(reqs, base["output_token_ids"]):
        prev = [r.prompt_token_ids[-1]] + toks[:-1]
        assert toks == [(t + 1) % 50 for t in prev] and len(toks) == r.output_len


def test_prefill_is_chunked_to_n_batch_beside_the_decodes(fake_llama):
    from hetis.bench.llamacpp_baseline import run_llamacpp_baseline
    from hetis.bench.workloads import BenchRequest
    model, log = fake_llama
    reqs = [BenchRequest([1] * 4, 30), BenchRequest([2] * 50, 3)]
    base = run_llamacpp_baseline(reqs, str(model), threads=1, n_slots=2, log=lambda m: None,
                                 n_batch=16)
    sizes = [b["n"] for b in json.loads(log.read_text())["batches"]]
    assert max(sizes) == 16 and base["failed"] == 0   # 50 prompt tokens in chunks beside decodes
    assert base["output_token_ids"][1] == [3, 4, 5]
