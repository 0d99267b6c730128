"""`noncooperative`: the fixed-price pairwise exchange (FPX), strategy-proof, SI and
weighted EF. No solver: one pass over the m(m-1)/2 markets of GPU-type pairs at
public prices. The proofs are in docs/allocator.md; tests/unit/allocator/
test_strategyproof.py searches for profitable lies and finds none.
"""
from __future__ import annotations

import time

import numpy as np

from .problem import Allocation, Problem, best_within_cap


def noncooperative(p: Problem) -> Allocation:
    """Fixed-price pairwise exchange (FPX): strategy-proof, SI and weighted EF.

    1. Every tenant starts from its weighted equal share e_i and splits its share of
       each type j into m-1 equal chips, one per market {j, l}.
    2. In market {j, l} a tenant with s_il/p_l > s_ij/p_j offers its j-chip for l at
       the public rate p_j/p_l (and vice versa; ties do not trade). The shorter side
       trades fully, the longer side is rationed in proportion to its chips.
    3. A tenant with a cap keeps the best d_i GPUs of the result; the rest stays idle.
    Prices p are public (never from reports); if some cap binds at the equal share
    they fall back to 1:1, which keeps GPU counts and so the caps' proofs intact.
    Proofs in docs/allocator.md.
    """
    t0 = time.perf_counter()
    m, s = p.m, p.speedup
    e = p.equal_share
    capped_at_e = bool(np.any(p.caps < e.sum(axis=1) * (1 - 1e-12)))
    prices = np.ones(m) if p.prices is None or capped_at_e else p.prices
    x = e.copy()
    chips = e / max(m - 1, 1)
    traded = 0.0
    for j in range(m):
        for l in range(j + 1, m):
            vj, vl = s[:, j] / prices[j], s[:, l] / prices[l]
            sell_j = vl > vj * (1 + 1e-12)
            sell_l = vj > vl * (1 + 1e-12)
            offer_j = chips[sell_j, j].sum() * prices[j]
            offer_l = chips[sell_l, l].sum() * prices[l]
            value = min(offer_j, offer_l)
            if value <= 0:
                continue
            gj, gl = chips[sell_j, j] * (value / offer_j), chips[sell_l, l] * (value / offer_l)
            x[sell_j, j] -= gj
            x[sell_j, l] += gj * prices[j] / prices[l]
            x[sell_l, l] -= gl
            x[sell_l, j] += gl * prices[l] / prices[j]
            traded += value
    x = best_within_cap(s, p.caps, np.clip(x, 0.0, None))
    return Allocation("noncooperative", x, time.perf_counter() - t0,
                      {"prices": prices.tolist(), "traded_value": traded})
