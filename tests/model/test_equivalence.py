"""The engine reproduces transformers exactly in float32, whatever the placement."""
from __future__ import annotations

import json

import pytest
import torch

from hetis import LLM, SamplingParams
from tests.helpers.reference import hf_greedy

GREEDY32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_tokens(hf_model, prompts):
    return [hf_greedy(hf_model, ids, 32) for ids in prompts]


def _gen(llm, prompts):
    return [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY32)]


def test_greedy_tokens_identical_to_transformers(llm, prompts, hf_tokens):
    ours = _gen(llm, prompts)
    for i, (a, b) in enumerate(zip(ours, hf_tokens)):
        assert a == b, f"prompt {i} diverges"
    assert all(len(t) == 32 for t in ours)


def test_logits_match_transformers(llm, hf_model, prompts):
    ids = prompts[2]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, -1]
    eng = llm.engine
    eng.add_request("logits-probe", ids, SamplingParams(temperature=0, max_tokens=1))
    from hetis.engine.step import Step, StepChunk
    chunks = eng.scheduler.schedule()
    step = Step([StepChunk(c.seq.seq_id, c.start, c.seq.tokens(c.start, c.start + c.num_new),
                           c.sample) for c in chunks], eng.scheduler.items(chunks))
    ours = eng.executor.forward(step)[0]
    eng.abort("logits-probe")
    assert (ours - ref).abs().max().item() < 1e-3


# [0, 1, 2] (each group on its own backend, in order) is round-robin's placement of the first
# request in test_the_dispatcher_places_in_process_and_tokens_stay_exact, exact there too
@pytest.mark.parametrize("placement", [[0, 0, 1], [2, 0, 1]])
def test_tokens_identical_whatever_the_placement(prompts, hf_tokens, placement):
    split = LLM(placement=placement)
    assert len(split.engine.executor.backends) == max(placement) + 1
    assert _gen(split, prompts) == hf_tokens


@pytest.mark.parametrize("policy", ["hetis", "round-robin"])
def test_the_dispatcher_places_in_process_and_tokens_stay_exact(prompts, hf_tokens, policy):
    llm = LLM(num_backends=3, policy=policy)
    placements = []
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", p, GREEDY32)
    eng.step()  # every request admitted and placed by the dispatcher
    placements = [s.placement for s in eng.seqs.values()]
    eng.run_to_completion()
    ours = [s.output_token_ids for s in eng.seqs.values()]
    assert ours == hf_tokens
    used = {b for pl in placements for b in pl}
    assert used == {0, 1, 2}, f"{policy} left a backend idle: {placements}"
    if policy == "round-robin":
        assert placements[0] == [0, 1, 2]


def test_placement_is_validated():
    with pytest.raises(ValueError, match="placement"):
        LLM(placement=[0, 1])
    with pytest.raises(ValueError, match="placement"):
        LLM(placement=[0, 2, 2])
    with pytest.raises(ValueError, match="policy"):
        LLM(num_backends=2, policy="fastest")
    with pytest.raises(ValueError, match="placement"):
        LLM(placement=[0, 0, 1], policy="hetis")


def test_hugging_face_directory_loads_identically(tmp_path, llm, prompts, hf_tokens):
    """A HF directory (config.json, *.safetensors, tokenizer.json) written from the GGUF weights."""
    from safetensors.torch import save_file

    from hetis.model.loader import load
    cfg, sd, tok = load(None)
    half = len(sd) // 2  # two shards, as large checkpoints come
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position, "tie_word_embeddings": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}))
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": tok.id_to_token(tok.eos_token_ids[0]), "bos_token": tok.id_to_token(tok.bos_token_id),
        "chat_template": tok.chat_template}))
    hf_dir = LLM(model=str(tmp_path))
    assert hf_dir.model_config.num_kv_heads == 3 and hf_dir.tokenizer.eos_token_ids == tok.eos_token_ids
    assert hf_dir.tokenizer.encode("Hello world 42") == tok.encode("Hello world 42")
    assert _gen(hf_dir, prompts[:2]) == hf_tokens[:2]
    chat = [{"role": "user", "content": "Hi"}]
    assert hf_dir.chat(chat, SamplingParams(temperature=0))[0].text == \
        llm.chat(chat, SamplingParams(temperature=0))[0].text


def test_bfloat16_runs_and_tracks_float32(llm, prompts):
    bf = LLM(dtype="bfloat16")
    model = bf.engine.executor.model
    w = model.layers[0]["qkv"]
    assert model.dtype == torch.bfloat16
    assert torch.equal(w, w.to(torch.bfloat16).to(w.dtype))  # weights carry bf16's precision
    assert bf.engine.executor.backends[0].store.k.dtype == torch.bfloat16  # and so does the KV cache
    out = bf.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=8))[0]
    ref = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.token_ids[:2] == ref.token_ids[:2]  # bf16 rounding may diverge later, not at once
    assert out.text.strip()


def test_bad_model_and_dtype_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="float16")
    with pytest.raises(FileNotFoundError, match="model"):
        LLM(model=str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(model=str(tmp_path))
