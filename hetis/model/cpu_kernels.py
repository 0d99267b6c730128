"""The engine's CPU kernels (hetis/model/csrc/), compiled on first use, called through ctypes.

Two libraries:

- ``paged_decode`` (paged_decode.cpp): decode attention straight over the paged
  KV cache. PyTorch has no paged attention for the CPU, and the fallback
  (gather every item's blocks into a padded buffer, then masked
  ``scaled_dot_product_attention``) reads and writes the whole context once more
  than it needs to, per layer: at batch 32 x 3 head groups, contexts of about
  300, it was a third of the decode step. The kernel reads each cached key and
  value row once, in place through the block table, for all of a group's query
  rows, and stops at each item's own length (no padding, no mask).
- ``fused_ops`` (fused_ops.cpp): the dense model's small per-layer operations
  (RMSNorm, residual add + RMSNorm, RoPE with the q/k/v split, SiLU x up) in
  four calls instead of about seventy PyTorch operations, which at one or a few
  sequences cost as much as the layer's matrix multiplications. They round
  where PyTorch's eager code rounds (hetis/model/dense.py's ``EagerOps`` is the
  reference; tests/unit/test_cpu_kernels.py compares them).

Each is compiled with the system C++ compiler (``g++ -O3 -march=native
-fopenmp``, about a second) into ``$HETIS_KERNEL_CACHE`` (default
``~/.cache/hetis/kernels``), keyed by its source, the flags, the compiler and this
CPU's flags, so a cache shared by machines of different kinds never loads code
built for another CPU; a build goes to a private file renamed into place, so
processes starting together never load a half-written one. ``make install``
builds them ahead (``python -m hetis.model.cpu_kernels``). They run on torch's
thread count.

Without a compiler (or with ``HETIS_CPU_KERNELS=0``) the engine keeps PyTorch's
operations (gather + SDPA, eager norms and RoPE) and says so once in the log;
results agree to float32 rounding either way.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import torch

log = logging.getLogger(__name__)

CSRC = pathlib.Path(__file__).parent / "csrc"
HEADERS = ("bf16.h",)
BASE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# fast-math for libmvec's vector expf; fused_ops keeps products and sums apart where
# PyTorch rounds between them (no FMA contraction, no reassociation)
LIBS = {
    "paged_decode": (BASE_FLAGS + ["-ffast-math"], 3),
    "fused_ops": (BASE_FLAGS + ["-ffast-math", "-fno-associative-math", "-fno-reciprocal-math",
                             "-ffp-contract=off"], 4),
}
_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "paged_decode": {"hetis_paged_decode": [_P] * 4 + [_I, _P, _P] + [_I] * 4 + [_F, _C],
                     "hetis_paged_decode_q8": [_P] * 6 + [_I, _P, _P] + [_I] * 4 + [_F, _C]},
    "fused_ops": {
        "hetis_rms_norm": [_P, _I, _P, _P, _I, _I, _F, _C],
        "hetis_add_rms_norm": [_P, _P, _I, _P, _P, _I, _I, _F, _C],
        "hetis_rope_split": [_P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _C],
        "hetis_silu_mul": [_P, _I, _P, _I, _I, _C],
        "hetis_q8_linear": [_P, _P, _P, _P, _I, _I, _I, _C],
        "hetis_kv_write_q8": [_P, _I, _P, _I] + [_P] * 5 + [_I, _I, _I, _C],
        "hetis_kv_write": [_P, _I, _P, _I] + [_P] * 3 + [_I, _I, _I],
    },
}
UNSUFFIXED = {"paged_decode": {"hetis_paged_decode_fast": [_I, _I, _C, _C]}}   # one for every dtype
# return types (the rest return nothing): the writes count the rows they refused (slot out
# of range); paged_decode_fast answers 0 or 1
RESTYPES = {"hetis_kv_write": _I, "hetis_kv_write_q8": _I, "hetis_paged_decode_fast": _C}
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HETIS_KERNEL_CACHE") or pathlib.Path.home() / ".cache/hetis/kernels")


def enabled() -> bool:
    return os.environ.get("HETIS_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(name: str = "paged_decode", verbose: bool = False) -> pathlib.Path:
    """Compile library ``name`` (or find it already built); its shared object's path.

    Raises RuntimeError naming the compiler's error when it cannot be built."""
    flags, _ = LIBS[name]
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found: install one (Debian: apt-get install g++) "
                           "or set CXX")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    source = CSRC / f"{name}.cpp"
    parts = [source.read_bytes(), *((CSRC / h).read_bytes() for h in HEADERS),
             " ".join(flags).encode(), version.encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{CSRC}", str(source), "-o", tmp]
    if verbose:
        print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building {source.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def library(name: str = "paged_decode") -> ctypes.CDLL | None:
    """Library ``name`` loaded, or None where kernels are off or it cannot be built
    (logged once)."""
    if name in _libs:
        return _libs[name]
    with _lock:
        if name in _libs:
            return _libs[name]
        lib = None
        if not enabled():
            log.info("CPU kernel %s off (HETIS_CPU_KERNELS=0): PyTorch operations instead", name)
        else:
            try:
                lib = ctypes.CDLL(str(build(name)))
                if getattr(lib, f"hetis_{name}_abi")() != LIBS[name][1]:
                    raise RuntimeError("stale kernel build (ABI mismatch)")
                typed = [(f"{fn}_{sfx}", fn, args) for fn, args in SIGNATURES[name].items()
                         for sfx in SUFFIX.values()]
                for symbol, fn_name, argtypes in typed + [(f, f, a) for f, a in UNSUFFIXED.get(name, {}).items()]:
                    fn = getattr(lib, symbol)
                    fn.restype, fn.argtypes = RESTYPES.get(fn_name), argtypes
            except (RuntimeError, OSError) as e:
                log.warning("CPU kernel %s unavailable, using PyTorch operations: %s", name, e)
                lib = None
        _libs[name] = lib
        return lib


def supports(t: torch.Tensor, name: str = "paged_decode", dtype: torch.dtype | None = None) -> bool:
    """Whether library ``name`` serves tensors like ``t`` (CPU, float32 or bfloat16;
    ``dtype``: computing in that dtype, as over an 8-bit cache)."""
    return t.device.type == "cpu" and (dtype or t.dtype) in SUFFIX and library(name) is not None


def function(name: str, op: str, dtype: torch.dtype):
    """Kernel ``op`` of library ``name`` for ``dtype`` (ctypes; the library must load)."""
    return getattr(library(name), f"{op}_{SUFFIX[dtype]}")


def paged_decode(k_layer: torch.Tensor, v_layer: torch.Tensor, q: torch.Tensor, tables: torch.Tensor,
                 ctx: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """softmax(q K^T * scale) V for one query token per item, over the paged cache: one
    :class:`PagedDecode` call (the engine prepares one a step and calls it per layer).

    k_layer, v_layer: one layer's cache, contiguous, [blocks * block_size, D] (or
    [blocks, block_size, D]); q: [N, H, D]; tables: [N, B] block ids (rows padded past
    each item's blocks: never read); ctx: [N], the tokens each item attends to. Returns
    [N, H, D] in the cache's dtype.
    """
    assert k_layer.is_contiguous() and v_layer.is_contiguous()
    call = PagedDecode([(k_layer.data_ptr(), v_layer.data_ptr())], k_layer.dtype, False, tables, ctx,
                       block_size, scale)
    return call(0, q)


def paged_fast(head_dim: int, q_per_group: int, dtype: torch.dtype, quantized: bool) -> bool:
    """Whether one of paged_decode's vector loops (not the generic one) serves this shape
    on this CPU (AVX-512 BF16 for bf16 caches, AVX-512 for int8; head dim 64 or 128; 1, 2,
    3, 4 or 8 query rows a group; not with HETIS_PAGED_GENERIC=1)."""
    lib = library("paged_decode")
    return lib is not None and bool(lib.hetis_paged_decode_fast(head_dim, q_per_group,
                                                                int(dtype == torch.bfloat16), int(quantized)))


class PagedDecode:
    """One step's decode batch for :func:`paged_decode` (or its 8-bit twin), prepared once
    and called once per layer: the block tables', the lengths' and every layer's cache
    pointers are taken here, so a layer's call is the kernel and little else (at one
    stream the checks and conversions of :func:`paged_decode` cost twice the kernel).

    ``layers``: per layer, the cache tensors' data pointers (k, v; for an 8-bit cache
    k, v, k scales, v scales: hetis/model/kv_store.py ``KVStore.layer_ptrs``)."""

    def __init__(self, layers: list[tuple[int, ...]], dtype: torch.dtype, quantized: bool,
                 tables: torch.Tensor, ctx: torch.Tensor, block_size: int, scale: float):
        self.layers, self.dtype, self.bs, self.scale = layers, dtype, block_size, float(scale)
        self.tables = tables.to(torch.int64).contiguous()   # kept: the kernel reads them
        self.ctx = ctx.to(torch.int64).contiguous()
        self.n = len(self.ctx)
        self.fn = function("paged_decode", "hetis_paged_decode_q8" if quantized else "hetis_paged_decode",
                           dtype)
        self.tail = (self.tables.data_ptr(), self.tables.stride(0) if self.n else 0, self.ctx.data_ptr())

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [N, H, D] (N the step's decode items) -> [N, H, D] in the store's dtype."""
        n, h, d = q.shape
        if n != self.n:
            raise ValueError(f"paged decode: {n} query rows for a step of {self.n} items")
        if q.dtype != self.dtype or not q.is_contiguous():
            q = q.to(self.dtype).contiguous()
        out = torch.empty((n, h, d), dtype=self.dtype)
        self.fn(*self.layers[layer], q.data_ptr(), *self.tail, out.data_ptr(), n, h, d, self.bs, self.scale,
                torch.get_num_threads())
        return out


def q8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16) @ W.T for a Q8_0 weight W = q * scale per block of
    32 (q int8 [N, K], scale float32 [N, K // 32]): float32 [M, N]."""
    x = x if x.is_contiguous() else x.contiguous()
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    function("fused_ops", "hetis_q8_linear", x.dtype)(x.data_ptr(), q.data_ptr(), scale.data_ptr(), out.data_ptr(),
                                                 m, n, k, torch.get_num_threads())
    return out


class FusedOps:
    """The dense model's small operations through fused_ops (the same interface as
    hetis/model/dense.py's EagerOps). Inputs: CPU tensors of one dtype, rows contiguous
    (a row stride is allowed where the signature takes one)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._rms = function("fused_ops", "hetis_rms_norm", dtype)
        self._add_rms = function("fused_ops", "hetis_add_rms_norm", dtype)
        self._rope = function("fused_ops", "hetis_rope_split", dtype)
        self._silu = function("fused_ops", "hetis_silu_mul", dtype)

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous():   # the common case, in one call
            return x
        return x if x.stride(-1) == 1 and (x.dim() == 1 or x.stride(0) >= x.shape[-1]) else x.contiguous()

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x = self._rows(x)
        n, d = x.shape
        out = torch.empty((n, d), dtype=x.dtype)
        self._rms(x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr(), n, d, eps,
                  torch.get_num_threads())
        return out

    def add_rms_norm(self, h: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """h += a in place; returns rms_norm(h) * w."""
        a = self._rows(a)
        n, d = h.shape
        out = torch.empty((n, d), dtype=h.dtype)
        self._add_rms(h.data_ptr(), a.data_ptr(), a.stride(0), w.data_ptr(), out.data_ptr(), n, d, eps,
                      torch.get_num_threads())
        return out

    def rope_split(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int,
                   d: int):
        """qkv [T, (hq + 2 hkv) d] -> q [T, hq, d], k, v [T, hkv, d], q and k rotated;
        cos, sin: [T, 1, d] contiguous (Rope.tables)."""
        qkv = self._rows(qkv)
        n = qkv.shape[0]
        q = torch.empty((n, hq, d), dtype=qkv.dtype)
        k = torch.empty((n, hkv, d), dtype=qkv.dtype)
        v = torch.empty((n, hkv, d), dtype=qkv.dtype)
        self._rope(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                   k.data_ptr(), v.data_ptr(), n, hq, hkv, d, torch.get_num_threads())
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2m] -> silu(gate) * up [T, m]."""
        gate_up = self._rows(gate_up)
        n, m2 = gate_up.shape
        out = torch.empty((n, m2 // 2), dtype=gate_up.dtype)
        self._silu(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), n, m2 // 2,
                   torch.get_num_threads())
        return out


def main() -> int:
    """``python -m hetis.model.cpu_kernels``: build the kernels now (``make install`` does)."""
    for name in LIBS:
        try:
            print(f"CPU kernel {name}: {build(name, verbose=True)}")
        except RuntimeError as e:
            print(f"CPU kernel {name} not built, the engine will use PyTorch operations: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
