"""Every allocation mode by name: the two OEF modes and the baselines.

The names are plain strings so that naming them (the CLI's parser, the service's
flags) loads neither numpy nor scipy; `solver` imports the mode asked for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .problem import Allocation, Problem

MODES = ("cooperative", "noncooperative", "max-min", "throughput-sum", "equal", "partial-allocation")


def solver(mode: str) -> Callable[[Problem], Allocation]:
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r} (known: {', '.join(MODES)})")
    if mode == "cooperative":
        from .cooperative import cooperative
        return cooperative
    if mode == "noncooperative":
        from .noncooperative import noncooperative
        return noncooperative
    from .baselines import BASELINES
    return BASELINES[mode]


def allocate(p: Problem, mode: str, time_limit: float | None = None, warm: list | None = None,
             jobs: dict | None = None) -> Allocation:
    """``time_limit`` (seconds), ``warm`` (an earlier result's ``info["warm"]``) and ``jobs``
    (tenant -> [(job id, gpus)]: multi-GPU jobs make x a mix of feasible rounds, jobs.py)
    are cooperative's; the other modes have no budget to keep and ignore job sizes."""
    if mode == "cooperative":
        from .cooperative import cooperative
        from .lp import TIME_BUDGET
        return cooperative(p, time_limit=TIME_BUDGET if time_limit is None else time_limit, warm=warm,
                           jobs=jobs)
    return solver(mode)(p)
