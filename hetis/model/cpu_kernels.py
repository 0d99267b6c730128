"""The CPU decode-attention kernel over the paged KV cache (hetis/model/csrc/paged_decode.cpp).

Why a kernel of our own: PyTorch has no paged attention for the CPU, and the
fallback (gather every item's blocks into a padded buffer, then masked
``scaled_dot_product_attention``) reads and writes the whole context once more
than it needs to, per layer: measured at batch 32 x 3 head groups, contexts of
about 300, it was a third of the decode step. The kernel reads each cached key
and value row once, in place through the block table, for all of a group's query
rows, and stops at each item's own length (no padding, no mask).

It is compiled on first use with the system C++ compiler (``g++ -O3 -march=native
-fopenmp``, about a second) into ``$HETIS_KERNEL_CACHE`` (default
``~/.cache/hetis/kernels``), keyed by the source, the flags, the compiler and this
CPU's flags, so a cache shared by machines of different kinds never loads code
built for another CPU. ``make install`` builds it ahead. It is called through
ctypes on the tensors' raw pointers, on torch's own OpenMP runtime and thread
count.

Without a compiler (or with ``HETIS_PAGED_KERNEL=0``) the backend keeps the
gather + SDPA path and says so once in the log; results agree to float32
rounding either way (tests/unit/test_paged_kernel.py).
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

SOURCE = pathlib.Path(__file__).parent / "csrc" / "paged_decode.cpp"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ABI = 1

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HETIS_KERNEL_CACHE") or pathlib.Path.home() / ".cache/hetis/kernels")


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


def build(verbose: bool = False) -> pathlib.Path:
    """Compile the kernel (or find it already built); its shared object's path.

    Raises RuntimeError naming the compiler's error when it cannot be built."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found: install one (Debian: apt-get install g++) "
                           "or set CXX")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    out = cache_dir() / f"paged_decode-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build to a private name, then rename: processes starting together (a mesh's
    # workers) never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, str(SOURCE), "-o", tmp]
    if verbose:
        print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it is turned off or cannot be built (logged once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("HETIS_PAGED_KERNEL", "1") in ("0", "false", "no", "off"):
            log.info("paged decode kernel off (HETIS_PAGED_KERNEL=0): gather + SDPA")
        else:
            try:
                lib = ctypes.CDLL(str(build()))
                if lib.hetis_paged_decode_abi() != ABI:
                    raise RuntimeError("stale kernel build (ABI mismatch)")
                for name in ("hetis_paged_decode_f32", "hetis_paged_decode_bf16"):
                    fn = getattr(lib, name)
                    fn.restype = None
                    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] \
                        + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
                _lib = lib
            except (RuntimeError, OSError) as e:
                log.warning("paged decode kernel unavailable, using gather + SDPA: %s", e)
        _tried = True
        return _lib


def supports(cache: torch.Tensor) -> bool:
    """Whether the kernel can serve a cache like this one (CPU, float32 or bfloat16)."""
    return cache.device.type == "cpu" and cache.dtype in (torch.float32, torch.bfloat16) \
        and library() is not None


def paged_decode(k_layer: torch.Tensor, v_layer: torch.Tensor, q: torch.Tensor, tables: torch.Tensor,
                 ctx: torch.Tensor, block_size: int, scale: float, out: torch.Tensor | None = None):
    """softmax(q K^T * scale) V for one query token per item, over the paged cache.

    k_layer, v_layer: one layer's cache, contiguous, [blocks * block_size, D] (or
    [blocks, block_size, D]); q: [N, H, D] in the cache's dtype; tables: int64 [N, B]
    block ids (rows padded past each item's blocks: never read); ctx: int64 [N], the
    tokens each item attends to. Returns [N, H, D] in the cache's dtype.
    """
    lib = library()
    assert lib is not None, "paged decode kernel unavailable"
    n, h, d = q.shape
    dt = k_layer.dtype
    if q.dtype != dt or not q.is_contiguous():
        q = q.to(dt).contiguous()
    assert k_layer.is_contiguous() and v_layer.is_contiguous()
    tables = tables if tables.dtype == torch.int64 and tables.is_contiguous() \
        else tables.to(torch.int64).contiguous()
    ctx = ctx if ctx.dtype == torch.int64 and ctx.is_contiguous() else ctx.to(torch.int64).contiguous()
    if out is None:
        out = torch.empty((n, h, d), dtype=dt)
    fn = lib.hetis_paged_decode_bf16 if dt == torch.bfloat16 else lib.hetis_paged_decode_f32
    fn(k_layer.data_ptr(), v_layer.data_ptr(), q.data_ptr(), tables.data_ptr(), tables.stride(0) if n else 0,
       ctx.data_ptr(), out.data_ptr(), n, h, d, block_size, float(scale), torch.get_num_threads())
    return out


def main() -> int:
    """``python -m hetis.model.paged_kernel``: build the kernel now (``make install`` does)."""
    try:
        path = build(verbose=True)
    except RuntimeError as e:
        print(f"paged decode kernel not built, the engine will use gather + SDPA: {e}")
        return 0
    print(f"paged decode kernel: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
