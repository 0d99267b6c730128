"""The data plane keeps every tensor on the model's device.

We have no GPU to run the CUDA path on; this is how it stays honest. The dense
model, the attention backend and the executor run a prefill and a decode step
with weights, KV cache and activations on ``device="meta"`` (shapes, no data)
under a torch function mode that fails any operation mixing meta tensors with
tensors on another device: a tensor made on the CPU and used with the model's
would run here unnoticed on CPU-only machines and break on a GPU.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from hetis.engine.step import AttnItem, Step, StepChunk
from hetis.model.attention import AttentionBackend
from hetis.model.dense import DenseModel
from hetis.model.executor import Executor
from tests.helpers.fakes import MODEL


class SameDevice(TorchFunctionMode):
    """Raise when an op's tensor arguments or results are on more than one device.

    Explicit transfers (``Tensor.to``) are how a tensor built from Python lists on
    the host reaches the device once per step; they are the one exemption.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if "meta" in devices and func is not torch.Tensor.to:
            self.ops += 1
            assert devices == {"meta"}, f"{func} mixes devices {devices}"
        return out


def random_weights(cfg) -> dict[str, torch.Tensor]:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    sd = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, h), "model.norm.weight": torch.ones(h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        sd.update({p + "self_attn.q_proj.weight": torch.randn(cfg.num_heads * d, h),
                   p + "self_attn.k_proj.weight": torch.randn(cfg.num_kv_heads * d, h),
                   p + "self_attn.v_proj.weight": torch.randn(cfg.num_kv_heads * d, h),
                   p + "self_attn.o_proj.weight": torch.randn(h, cfg.num_heads * d),
                   p + "mlp.gate_proj.weight": torch.randn(i, h), p + "mlp.up_proj.weight": torch.randn(i, h),
                   p + "mlp.down_proj.weight": torch.randn(h, i),
                   p + "input_layernorm.weight": torch.ones(h),
                   p + "post_attention_layernorm.weight": torch.ones(h)})
    return sd


def test_prefill_and_decode_on_the_meta_device():
    cfg, bs = MODEL, 4
    model = DenseModel(cfg, random_weights(cfg), torch.float32, device="meta")
    backends = [AttentionBackend(cfg.num_layers, 16, bs, cfg.head_dim, cfg.q_per_group, torch.float32,
                                 device="meta") for _ in range(2)]
    ex = Executor(model, backends)
    placement = [0, 1, 0]
    tables = {g: [2 * g, 2 * g + 1] for g in range(cfg.num_groups)}  # 8 tokens per group

    def step(chunks):
        work = [[AttnItem(c.seq_id, g, c.start, len(c.token_ids), tables[g])
                 for c in chunks for g, b in enumerate(placement) if b == be] for be in range(2)]
        return Step(chunks, work)

    mode = SameDevice()
    with mode:
        prefill = ex.forward(step([StepChunk(1, 0, [5, 6, 7, 8, 9], sample=True)]))
        decode = ex.forward(step([StepChunk(1, 5, [10], sample=True)]))
    for logits in (prefill, decode):
        assert logits.device.type == "meta" and logits.shape == (1, cfg.vocab_size)
    assert mode.ops > 100  # the mode saw the step's work, not an empty path
    assert all(be.store.k.device.type == "meta" for be in backends)
