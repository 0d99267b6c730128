"""Benchmark workloads: request lengths, prompts made of real token ids, arrival times.

Two length distributions:

- ``random`` (vLLM's ``--dataset-name random``): input lengths uniform in
  ``[L_in * (1 - r), L_in * (1 + r)]`` and output lengths uniform in
  ``[L_out * (1 - r), L_out * (1 + r)]`` for ``--random-range-ratio r`` in [0, 1);
  or input lengths uniform in an explicit ``[--input-len-min, --input-len-max]``.
- ``sharegpt-synth``: ShareGPT-like lengths generated offline (no dataset file is
  read or downloaded). Prompt and output lengths are drawn independently from
  log-normal distributions whose means are the ShareGPT averages reported in the
  vLLM paper (Kwon et al., "Efficient Memory Management for Large Language Model
  Serving with PagedAttention", SOSP 2023, Fig. 11: mean input 161.31 tokens, mean
  output 337.99 tokens, OPT tokenizer). The paper gives the means and the shape of
  the histograms, not fitted parameters: the log-space standard deviation
  ``SHAREGPT_SIGMA = 1.0`` is our assumption, chosen to give the long right tail
  those histograms show (median = mean / e^0.5, i.e. about 98 and 205 tokens).
  mu is set so the untruncated mean equals the reported mean. Lengths are rounded,
  clipped below at 4 tokens (vLLM drops ShareGPT samples shorter than that), the
  prompt is clipped to ``max_model_len // 2`` and the output to what is left under
  ``max_model_len``; clipping lowers the means a little.

Prompts are random token ids drawn (seeded) from the tokenizer's ordinary tokens
(its special/added tokens are excluded) and sent as ``prompt_token_ids``, so the
prompt length is exact and nothing is lost to re-tokenisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hetis.engine.sampling import ParamError

SHAREGPT_MEAN_INPUT = 161.31    # vLLM paper (SOSP'23), Fig. 11, ShareGPT
SHAREGPT_MEAN_OUTPUT = 337.99
SHAREGPT_SIGMA = 1.0            # assumed log-space std (not a published fit)
MIN_LEN = 4


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def random_lengths(n: int, input_len: int, output_len: int, range_ratio: float,
                   rng: np.random.Generator, input_len_min: int | None = None,
                   input_len_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input lengths, output lengths), uniform as in vLLM's random dataset."""
    if not 0 <= range_ratio < 1:
        raise ParamError("random_range_ratio", f"must be in [0, 1) (got {range_ratio})")
    if input_len_min is not None or input_len_max is not None:
        lo = input_len_min if input_len_min is not None else input_len_max
        hi = input_len_max if input_len_max is not None else input_len_min
        if not 1 <= lo <= hi:
            raise ValueError(f"input length range: need 1 <= min <= max (got {lo}..{hi})")
    else:
        lo = max(1, int(input_len * (1 - range_ratio)))
        hi = max(lo, int(input_len * (1 + range_ratio)))
    olo = max(1, int(output_len * (1 - range_ratio)))
    ohi = max(olo, int(output_len * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n), rng.integers(olo, ohi + 1, size=n)


def lognormal_mu(mean: float, sigma: float) -> float:
    """mu of a log-normal with this mean: mean = exp(mu + sigma^2 / 2)."""
    return math.log(mean) - sigma ** 2 / 2


def sharegpt_synth_lengths(n: int, rng: np.random.Generator, max_model_len: int,
                           sigma: float = SHAREGPT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """ShareGPT-like (input, output) lengths; see the module docstring for the source."""
    if max_model_len < 2 * MIN_LEN:
        raise ParamError("max_model_len", f"{max_model_len} is too small for sharegpt-synth")
    inp = np.rint(rng.lognormal(lognormal_mu(SHAREGPT_MEAN_INPUT, sigma), sigma, size=n))
    out = np.rint(rng.lognormal(lognormal_mu(SHAREGPT_MEAN_OUTPUT, sigma), sigma, size=n))
    inp = np.clip(inp, MIN_LEN, max_model_len // 2).astype(np.int64)
    out = np.clip(out, MIN_LEN, max_model_len - inp).astype(np.int64)
    return inp, out


def ordinary_token_ids(vocab_size: int, special_ids) -> np.ndarray:
    """Token ids a prompt may contain: the vocabulary minus special/added tokens."""
    mask = np.ones(vocab_size, dtype=bool)
    special = [i for i in special_ids if 0 <= i < vocab_size]
    mask[special] = False
    return np.flatnonzero(mask)


def tokenizer_token_ids(tokenizer) -> np.ndarray:
    """``ordinary_token_ids`` for a ``hetis.tokenizer.Tokenizer``."""
    added = tokenizer.tok.get_added_tokens_decoder()
    return ordinary_token_ids(tokenizer.vocab_size, list(added))


def make_requests(input_lens, output_lens, token_ids: np.ndarray,
                  rng: np.random.Generator) -> list[BenchRequest]:
    return [BenchRequest(rng.choice(token_ids, size=int(i)).tolist(), int(o))
            for i, o in zip(input_lens, output_lens)]


def build_workload(args, token_ids: np.ndarray, max_model_len: int) -> list[BenchRequest]:
    """The requests ``hetis bench`` sends, from its flags (seeded by ``args.seed``)."""
    rng = np.random.default_rng(args.seed)
    if args.dataset == "random":
        inp, out = random_lengths(args.num_prompts, args.random_input_len, args.random_output_len,
                                  args.random_range_ratio, rng, args.input_len_min,
                                  args.input_len_max)
        too_long = int(np.max(inp + out)) if len(inp) else 0
        if too_long > max_model_len:
            raise ValueError(f"a request of {too_long} tokens (prompt + output) exceeds "
                             f"max_model_len={max_model_len}")
    elif args.dataset == "sharegpt-synth":
        inp, out = sharegpt_synth_lengths(args.num_prompts, rng, max_model_len)
    else:
        raise ParamError("dataset", f"unknown {args.dataset!r}")
    return make_requests(inp, out, token_ids, rng)


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Send times in seconds from the start, the first at 0.

    Gaps are gamma-distributed with shape ``burstiness`` and mean ``1 / request_rate``
    (burstiness 1: exponential gaps, a Poisson process; < 1 burstier, > 1 more
    regular), as in vLLM's benchmark_serving. ``request_rate`` inf: all at 0.
    """
    if burstiness <= 0:
        raise ParamError("burstiness", f"must be > 0 (got {burstiness})")
    if request_rate <= 0:
        raise ParamError("request_rate", f"must be > 0 (got {request_rate})")
    if math.isinf(request_rate) or n == 0:
        return np.zeros(n)
    rng = rng if rng is not None else np.random.default_rng()
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
