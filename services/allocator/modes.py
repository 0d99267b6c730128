"""Every allocation mode by name: the two OEF modes and the baselines."""
from __future__ import annotations

from .baselines import BASELINES
from .oef import Allocation, Problem, cooperative, noncooperative

MODES = {"cooperative": cooperative, "noncooperative": noncooperative, **BASELINES}


def allocate(p: Problem, mode: str) -> Allocation:
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r} (known: {', '.join(MODES)})")
    return MODES[mode](p)
