"""Gavel's measured throughputs (83 job types on v100/p100/k80).

The data come from stanford-futuredata/gavel (MIT License, Copyright (c) 2020
Stanford Future Data Systems), scheduler/physical_cluster_throughputs.json,
isolated entries only; the file's "source" field keeps the attribution. Looked up
in order: $HETIS_GAVEL_DATA, <repo>/../shared/data, the copy in ./data (package data).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib

FILE = "gavel_isolated_throughputs.json"
HERE = pathlib.Path(__file__).resolve().parent


def data_path() -> pathlib.Path:
    env = os.environ.get("HETIS_GAVEL_DATA")
    if env:
        return pathlib.Path(env)
    shared = HERE.parents[2] / "shared" / "data" / FILE
    return shared if shared.is_file() else HERE / "data" / FILE


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def jobs() -> list[dict]:
    """[{job_type, scale_factor, throughput_steps_per_s: {gpu_type: steps/s}}]."""
    return _load(str(data_path()))["jobs"]


def job_types() -> list[str]:
    return sorted({j["job_type"] for j in jobs()})


def throughput(job_type: str, scale_factor: int = 1) -> dict[str, float]:
    """Per-GPU throughput of one job type: the job's steps/s on scale_factor GPUs divided
    by scale_factor. KeyError names the job type (and the known ones) when unknown."""
    for j in jobs():
        if j["job_type"] == job_type and j["scale_factor"] == scale_factor:
            return {g: v / scale_factor for g, v in j["throughput_steps_per_s"].items()}
    known = [j["scale_factor"] for j in jobs() if j["job_type"] == job_type]
    if known:
        raise KeyError(f"job type {job_type!r} has no entry for scale_factor {scale_factor} "
                       f"(known: {sorted(known)})")
    raise KeyError(f"unknown job type {job_type!r}; known: {', '.join(job_types())}")
