"""Shared fixtures: the real default model, loaded once per session."""
from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before grpc: see hetis/__init__.py

import pytest  # noqa: E402
import torch
from hypothesis import settings

# One intra-op thread: the suite shares 2 cores with the mesh processes it starts, and
# OpenMP threads spinning against each other slow a step down 10-30x.
torch.set_num_threads(1)

# Property tests draw the same examples on every run and every machine (a seed derived
# from each test), so a CI run is reproducible and a red run can be rerun as it was.
# Set HYPOTHESIS_PROFILE=explore to draw fresh examples (and remember failures) locally.
settings.register_profile("hetis", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hetis"))


@pytest.fixture(scope="session")
def llm():
    from hetis import LLM
    return LLM(dtype="float32")


@pytest.fixture(scope="session")
def hf_model():
    """transformers' Llama loaded from the same GGUF file: the reference."""
    transformers = pytest.importorskip("transformers")
    from hetis.model.loader import default_model_path
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def prompts(llm):
    """Six prompts as token ids: short, code, a 150+ token one, and two chats."""
    tok = llm.tokenizer
    long_text = " ".join(
        f"Paragraph {i}: the river carried the boats past the old mill, where the miller "
        f"counted sacks of grain and wrote the number {i * 7} in his ledger." for i in range(8))
    texts = ["The capital of France is", "def fibonacci(n):",
             long_text + " Summarise the story:", "Once upon a time, in a land far away,"]
    ids = [tok.encode(t) for t in texts]
    ids.append(tok.encode_chat([{"role": "user", "content": "What is the tallest mountain?"}]))
    ids.append(tok.encode_chat([{"role": "system", "content": "You answer in French."},
                                {"role": "user", "content": "How are you today?"}]))
    assert len(ids[2]) >= 150
    return ids
