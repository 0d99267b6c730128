"""Weight-only 4-bit serving from the GGUF's own quantisation (``weights="gguf"``).

A GGUF file stores most Llama projections as Q4_0 or Q4_1: blocks of 32
weights along the input dimension, each block a scale ``d`` (float16), for
Q4_1 a minimum ``m`` too, and 32 four-bit values ``q``:

    Q4_0: w = d * (q - 8)        Q4_1: w = d * q + m

PyTorch's CPU kernel for weight-only int4 matmul
(``aten._weight_int4pack_mm_for_cpu``, the one torchao and gpt-fast use)
computes with ``w = (q - 8) * scale + zero`` per group of input columns, so
both formats map onto it exactly: ``scale = d``, ``zero = 0`` (Q4_0) or
``zero = m + 8 d`` (Q4_1), group size 32. The four-bit values are not widened
for it: about 5 bits per weight are read per token, against 16 in bf16, which
is what a decode step of one or a few sequences is bound by. Scales and zeros
are kept in float32 (the GGUF's float16 values exactly) and cast once to the
activations' dtype. Other tensors (norms, embeddings) are dequantised as usual;
a Q8_0 LM head (or the Q8_0 embeddings that serve as one) is also kept as it is
(:class:`Int8Weight`), and the logits of up to ``Q8_MAX_ROWS`` bfloat16 rows
are computed from it by the fused_ops kernel ``q8_linear`` (hetis/model/
cpu_kernels.py): 8.5 bits a weight read instead of 16, in float32 from the
GGUF's exact values (the dense copy rounds them to bfloat16 first).

Where the kernel pays, measured on the AVX-512 BF16 machine (one thread, a
1536 x 576 projection): in bfloat16 it takes 0.08 ms for 1 row against 0.17
for the dense GEMM, but 0.27 vs 0.18 for 8 rows, 1.1 vs 0.24 for 32 and 6.7
vs 0.6 for 200 (prefill); with float32 activations it is a slow reference path
(3 ms for 1 row). So the model keeps the dequantised weight beside the packed
one and uses the int4 kernel only for bfloat16 matmuls of at most
``INT4_MAX_ROWS`` rows (the decode of a few streams), the dense GEMM otherwise:
weights="gguf" speeds up small-batch bfloat16 decode and changes nothing else
(in float32 it computes exactly what weights="dense" does).

Accuracy: against the same weights dequantised, the int4 kernel's outputs
differ by the rounding of its arithmetic (tests/unit/test_quant.py;
tests/model/test_quant.py bounds the logits and greedy agreement in bf16).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

GROUP = 32
Q4_TYPES = ("Q4_0", "Q4_1")
INT4_MAX_ROWS = 4   # above this the dense GEMM is faster on the CPUs measured (module doc)
@functools.cache
def _int4_mm():
    """The int4 kernel's overload itself: calling it through torch.ops.aten's packet
    resolves the overload on every call, 3-4 us of a 7-25 us one-row matmul (120 of them
    a token). Looked up when first needed, so a torch without it fails only
    ``weights="gguf"``, not the import."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu.default
Q8_MAX_ROWS = 4     # the same for the Q8_0 LM head (docs/cpu.md)


@dataclass
class Int8Weight:
    """A [out, in] Q8_0 weight as the GGUF stores it: int8 values ``q`` [N, K] and a
    float32 scale per (row, block of 32) ``scale`` [N, K // 32]; w = scale * q."""
    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (a reference for tests)."""
        n, k = self.q.shape
        return (self.q.view(n, k // GROUP, GROUP).float() * self.scale[..., None]).view(n, k)


def q8_from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Int8Weight:
    """A Q8_0 tensor's raw blocks (a float16 scale and 32 int8 values each) as an
    :class:`Int8Weight`."""
    n, k = shape
    if k % GROUP:
        raise ValueError(f"weights: a Q8_0 row of {k} values is not whole blocks of 32")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // GROUP, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
    return Int8Weight(torch.from_numpy(q), torch.from_numpy(d).contiguous())


@dataclass
class Int4Weight:
    """A [out, in] weight as four-bit values with per-(row, group of 32) scale and zero.
    ``q`` is unpacked (uint8, one value per byte) until :meth:`packed` is asked for."""
    q: torch.Tensor | None   # [N, K] uint8 in 0..15 (None once packed)
    scale: torch.Tensor      # [N, K // 32] float32
    zero: torch.Tensor       # [N, K // 32] float32
    _packed: torch.Tensor | None = field(default=None, repr=False)
    _sz: dict = field(default_factory=dict, repr=False)
    dense: torch.Tensor | None = field(default=None, repr=False)  # for big or float32 matmuls

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scale.shape[0], self.scale.shape[1] * GROUP)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (a reference for tests)."""
        n, k = self.shape
        q = self.q.view(n, k // GROUP, GROUP).float()
        return ((q - 8) * self.scale[..., None] + self.zero[..., None]).view(n, k)

    def rows(self, perm: np.ndarray) -> "Int4Weight":
        """The rows in ``perm``'s order (before :meth:`prepare`)."""
        return Int4Weight(self.q[perm], self.scale[perm], self.zero[perm])

    def prepare(self, device, dtype: torch.dtype, compute: torch.dtype) -> "Int4Weight":
        """Ready for the model: the dense copy (rounded to ``dtype``, held in ``compute``)
        and, where the int4 kernel is used (bf16 compute), the packed form."""
        if str(device) != "cpu":
            raise ValueError("weights: 'gguf' (int4 weight-only) runs on the CPU kernel only; "
                             "use weights='dense' on a GPU")
        self.dense = self.dequantize().to(dtype).to(compute).contiguous()
        if compute == torch.bfloat16:
            self._pack()
        self.q = None
        return self

    def _pack(self) -> None:
        if self._packed is None:
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                self.q.to(torch.int32).contiguous(), 2)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> x @ W.T [T, N] with the int4 kernel, in x's dtype."""
        self._pack()
        sz = self._sz.get(x.dtype)
        if sz is None:
            sz = self._sz[x.dtype] = torch.stack([self.scale.t(), self.zero.t()], -1).to(
                x.dtype).contiguous()
        return _int4_mm()(x.contiguous(), self._packed, GROUP, sz)

    @staticmethod
    def cat(parts: list["Int4Weight"]) -> "Int4Weight":
        """Rows stacked (the fused q/k/v and gate/up projections)."""
        return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]))


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """``F.linear(x, w)`` for a dense weight or an :class:`Int4Weight` (its int4 kernel for
    a bfloat16 matmul of at most INT4_MAX_ROWS rows, its dense copy otherwise)."""
    if isinstance(w, Int4Weight):
        if x.dim() == 2 and x.shape[0] <= INT4_MAX_ROWS and w._packed is not None \
                and x.dtype == torch.bfloat16:   # a decode step's rows: no reshapes around it
            return w.matmul(x)
        rows = x.numel() // x.shape[-1]
        if w.dense is None or (w._packed is not None and rows <= INT4_MAX_ROWS
                               and x.dtype == torch.bfloat16):
            return w.matmul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], w.shape[0])
        w = w.dense
    return torch.nn.functional.linear(x, w)


def from_gguf(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Weight:
    """A Q4_0/Q4_1 tensor's raw blocks ([rows, bytes] uint8) as an :class:`Int4Weight`."""
    n, k = shape
    if k % GROUP:
        raise ValueError(f"weights: a {type_name} row of {k} values is not whole blocks of 32")
    per = 20 if type_name == "Q4_1" else 18
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // GROUP, per)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
        zero = m + 8.0 * d
    else:
        qs = blocks[..., 2:]
        zero = np.zeros_like(d)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)  # element j, then j + 16
    return Int4Weight(torch.from_numpy(q.astype(np.uint8)), torch.from_numpy(d),
                      torch.from_numpy(zero))
