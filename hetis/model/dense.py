"""A Llama-architecture decoder split along the Hetis seam.

``DenseModel`` holds every weight (embeddings, RMSNorms, fused QKV and O
projections, SwiGLU MLP, LM head) and no KV cache. Attention is not computed
here: :meth:`DenseModel.forward` calls ``attend(layer, q, k, v)`` once per
layer with the rotated queries and keys of every token in the step and takes
back the attention output; who computes which head groups is the executor's
business (hetis/executor.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hetis.defaults import DTYPE_NAMES
from hetis.model import cpu_kernels
from hetis.model.config import ModelConfig
from hetis.model.quant import Q8_MAX_ROWS, Int4Weight, linear

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16)))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name (or torch dtype) the engine supports, as a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: statistics in float32, scale in the weight dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


class Rope:
    """Rotate-half RoPE with a cos/sin table built once."""

    def __init__(self, head_dim: int, theta: float, max_pos: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        ang = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
        emb = torch.cat([ang, ang], dim=-1)
        self.cos, self.sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the step's positions, shaped [T, 1, D]; gathered once per step."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
        return x * cos + rot * sin


class EagerOps:
    """The dense model's small operations in PyTorch (any device): the reference that
    hetis/model/cpu_kernels.py's FusedOps computes in fewer calls on the CPU."""

    @staticmethod
    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, w, eps)

    @staticmethod
    def add_rms_norm(h: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """h += a in place; returns rms_norm(h) * w."""
        h += a
        return rms_norm(h, w, eps)

    @staticmethod
    def rope_split(qkv: torch.Tensor, cos, sin, hq: int, hkv: int, d: int):
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        return (Rope.apply(q.view(-1, hq, d), cos, sin), Rope.apply(k.view(-1, hkv, d), cos, sin),
                v.view(-1, hkv, d))

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def native_matmul(dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether GEMMs in ``dtype`` run at full speed on ``device``.

    x86 CPUs without AVX-512 BF16 or AMX emulate bf16 GEMMs; measured on the
    project's AVX2 machines: 8 GFLOPS in bf16 against 50-60 in float32.
    """
    if dtype == torch.float32 or str(device).startswith("cuda"):
        return True
    cap = torch.backends.cpu.get_cpu_capability()
    if "AMX" in cap or "BF16" in cap:
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class DenseModel:
    """The weights and the dense math of a Llama decoder (no attention, no cache).

    ``dtype`` is the model's precision: weights are rounded to it, and the KV
    cache and the tensors sent to attention workers use it. The GEMMs run in
    ``compute_dtype``: ``dtype`` itself where the hardware multiplies it
    natively, else float32 (bf16 weights then upcast once, at load, so the
    numbers are bf16's but the speed is float32's).
    """

    def __init__(self, cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: str = "cpu"):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.compute_dtype = dtype if native_matmul(dtype, device) else torch.float32
        cd = self.compute_dtype

        def take(k):  # round to the model's dtype first (bf16 numbers), then move and widen
            w = sd.pop(k)
            return w if isinstance(w, Int4Weight) else w.to(dtype).to(device, cd).contiguous()

        def ready(w):  # an int4 weight (weights="gguf", hetis/model/quant.py), once whole
            return w.prepare(device, dtype, cd) if isinstance(w, Int4Weight) else w

        def cat(ws):  # the fused projections
            return ready(Int4Weight.cat(ws)) if isinstance(ws[0], Int4Weight) else torch.cat(ws)
        q8 = {"embed": sd.pop("model.embed_tokens.q8", None), "head": sd.pop("lm_head.q8", None)}
        self.embed = take("model.embed_tokens.weight")
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in sd
        self.lm_head = self.embed if tied else take("lm_head.weight")
        # weights="gguf": a Q8_0 LM head read as it is for a few bf16 rows (hetis/model/quant.py)
        self.lm_head_q8 = q8["embed" if tied else "head"]
        if self.lm_head_q8 is not None and not (cd == torch.bfloat16 and self.device.type == "cpu"
                                                and cpu_kernels.supports(self.lm_head, "fused_ops")):
            self.lm_head_q8 = None
        self.norm = take("model.norm.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = cat([take(p + "self_attn.q_proj.weight"), take(p + "self_attn.k_proj.weight"),
                       take(p + "self_attn.v_proj.weight")])
            gate_up = cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            self.layers.append(dict(
                ln1=take(p + "input_layernorm.weight"), ln2=take(p + "post_attention_layernorm.weight"),
                qkv=qkv, o=ready(take(p + "self_attn.o_proj.weight")), gate_up=gate_up,
                down=ready(take(p + "mlp.down_proj.weight"))))
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.max_position, cd, device)
        # the small per-layer operations: fused CPU kernels where they build, else PyTorch's
        self.ops = cpu_kernels.FusedOps(cd) if cpu_kernels.supports(self.norm, "fused_ops") \
            and self.norm.dtype == cd else EagerOps()
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def qkv(self, layer: int, x: torch.Tensor, cos, sin):
        """Pre-attention half of a layer on the normed hidden state ``x``: q [T, H, D],
        k and v [T, KV, D] (q and k rotated)."""
        c = self.cfg
        return self.ops.rope_split(linear(x, self.layers[layer]["qkv"]), cos, sin, c.num_heads,
                                   c.num_kv_heads, c.head_dim)

    # The two projections whose outputs tensor parallelism sums across ranks
    # (hetis/model/tp.py wraps them; the model does not know).
    def o_proj(self, layer: int, attn: torch.Tensor) -> torch.Tensor:
        return linear(attn, self.layers[layer]["o"])

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        L = self.layers[layer]
        return linear(self.ops.silu_mul(linear(x, L["gate_up"])), L["down"])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.norm, self.cfg.rms_norm_eps)
        if self.lm_head_q8 is not None and x.shape[0] <= Q8_MAX_ROWS:
            return cpu_kernels.q8_linear(x, self.lm_head_q8.q, self.lm_head_q8.scale)
        return F.linear(x, self.lm_head).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logit_rows: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        """Run every layer; return float32 logits of the rows in ``logit_rows``."""
        ops, eps, layers = self.ops, self.cfg.rms_norm_eps, self.layers
        h = self.embed[input_ids]   # a fresh tensor: the residual stream, updated in place
        cos, sin = self.rope.tables(positions)
        x = ops.rms_norm(h, layers[0]["ln1"], eps)
        for i, L in enumerate(layers):
            q, k, v = self.qkv(i, x, cos, sin)
            a = attend(i, q, k, v)
            x = ops.add_rms_norm(h, self.o_proj(i, a.reshape(h.shape[0], -1)), L["ln2"], eps)
            m = self.mlp(i, x)
            if i + 1 < len(layers):   # the residual add and the next layer's norm together
                x = ops.add_rms_norm(h, m, layers[i + 1]["ln1"], eps)
            else:
                h += m
        return self.logits(h[logit_rows])
