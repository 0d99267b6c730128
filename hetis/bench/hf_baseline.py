"""The Hugging Face baseline: ``transformers`` ``generate`` on the same requests.

Static batches of ``batch_size`` requests in arrival order, float32, greedy,
left-padded with an attention mask, ``min_new_tokens = max_new_tokens`` so every
request gets exactly its output length (a batch runs to its longest request; only
each request's own output tokens are counted). All requests are there at t=0
(an offline run, no arrivals); a request's latency is its batch's end.

The model is loaded from the same GGUF file as the engine, through
``from_pretrained(dir, gguf_file=name)`` (as tests/conftest.py's reference
does). Reading a GGUF that way takes ~45 s, so the converted model is kept with
safetensors in ``$HETIS_CACHE_DIR`` (default ~/.cache/hetis; ``off``
disables it), keyed by the file's path, size, mtime and the transformers version.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid

import torch

from hetis.engine.sampling import ParamError


def _cache_dir(path: str, transformers_version: str) -> str | None:
    root = os.environ.get("HETIS_CACHE_DIR") or os.path.expanduser("~/.cache/hetis")
    if root == "off":
        return None
    st = os.stat(path)
    key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{transformers_version}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(root, f"hf-{os.path.splitext(os.path.basename(path))[0]}-{digest}")


def load_hf_model(model: str | None = None):
    """transformers' causal LM (float32, eval) for a .gguf file or HF directory."""
    try:
        import transformers
    except ImportError:
        raise RuntimeError("--baseline hf needs transformers and accelerate "
                           "(pip install -e '.[test]')") from None
    from hetis.model.loader import resolve_model
    path = resolve_model(model)
    auto = transformers.AutoModelForCausalLM
    if os.path.isdir(path):
        return auto.from_pretrained(path, dtype=torch.float32).eval()
    cached = _cache_dir(path, transformers.__version__)
    if cached and os.path.exists(os.path.join(cached, "config.json")):
        try:
            return _load_cached(cached)
        except Exception:  # noqa: BLE001 - a damaged cache only costs the GGUF read
            shutil.rmtree(cached, ignore_errors=True)
    m = auto.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                             dtype=torch.float32).eval()
    if cached:
        _save_cached(m, cached)
    return m


def _save_cached(m, cached: str) -> None:
    """Weights (safetensors) and config; ``save_pretrained`` refuses GGUF-loaded models."""
    from safetensors.torch import save_model
    tmp = f"{cached}.{uuid.uuid4().hex}.tmp"
    try:
        os.makedirs(tmp)
        save_model(m, os.path.join(tmp, "model.safetensors"))
        cfg = m.config.to_dict()
        cfg.pop("quantization_config", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        os.replace(tmp, cached)
    except Exception:  # noqa: BLE001 - another process won, or a read-only home
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(cached: str):
    import transformers
    from safetensors.torch import load_model
    with open(os.path.join(cached, "config.json")) as f:
        cfg = json.load(f)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    m = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_model(m, os.path.join(cached, "model.safetensors"))
    return m.eval()


def run_hf_baseline(requests, model, batch_size: int = 8, pad_token_id: int = 0,
                    progress: bool = False, warmup: bool = True) -> dict:
    """Generate for ``requests`` (``BenchRequest``s) in static batches; throughput and latency."""
    if batch_size < 1:
        raise ParamError("baseline_batch", f"must be >= 1 (got {batch_size})")
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    if warmup and requests:
        _generate(model, [requests[0].prompt_token_ids[:8]], 2, pad_token_id)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc="hf baseline", unit="req")
    latencies, batch_times, out_tokens = [], [], 0
    t0 = time.perf_counter()
    for batch in batches:
        n_new = max(r.output_len for r in batch)
        tb = time.perf_counter()
        _generate(model, [r.prompt_token_ids for r in batch], n_new, pad_token_id)
        now = time.perf_counter()
        batch_times.append(now - tb)
        latencies += [now - t0] * len(batch)
        out_tokens += sum(r.output_len for r in batch)
        if bar:
            bar.update(len(batch))
    duration = time.perf_counter() - t0
    if bar:
        bar.close()
    in_tokens = sum(r.prompt_len for r in requests)
    dur = max(duration, 1e-9)
    lat_ms = torch.tensor(latencies, dtype=torch.float64) * 1e3 if latencies else torch.zeros(1)
    return {"name": "hf-transformers", "dtype": "float32", "batch_size": batch_size,
            "num_batches": len(batches), "completed": len(requests), "duration_s": duration,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "request_throughput": len(requests) / dur, "output_throughput": out_tokens / dur,
            "total_token_throughput": (in_tokens + out_tokens) / dur,
            "mean_e2el_ms": float(lat_ms.mean()), "median_e2el_ms": float(lat_ms.median()),
            "mean_batch_s": sum(batch_times) / max(len(batch_times), 1),
            "threads": torch.get_num_threads()}


def _generate(model, prompts: list[list[int]], n_new: int, pad_token_id: int) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):      # left padding: the new tokens line up on the right
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False, pad_token_id=pad_token_id)
    assert out.shape[1] == width + n_new, "generate stopped early"
    return out[:, width:]
