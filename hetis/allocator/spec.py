"""Validated tenants and inventories, from YAML files (the CLI) or plain dicts (gRPC).

Every error is a `SpecError` naming the field (``tenants[1].throughput.v100``) and,
for files, the line. The file format::

    gpus: {v100: 4, p100: 4, k80: 8}
    prices: {v100: 4.9, p100: 3.3, k80: 1}     # optional, noncooperative exchange rates
    tenants:
      - name: alice
        weight: 1                               # optional, default 1
        throughput: {v100: 4.4, p100: 2.6, k80: 0.6}
        max_gpus: 6                             # optional demand cap
      - name: bob
        job_type: "ResNet-50 (batch size 64)"   # throughput from the Gavel data
        scale_factor: 1                         # optional, GPUs per job in that data
        jobs: [{id: train, gpus: 2}]            # optional; caps the demand at their sum
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import yaml

from . import gavel
from .problem import Problem

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class SpecError(ValueError):
    def __init__(self, field: str, message: str, line: int | None = None, source: str | None = None):
        self.field, self.message, self.line, self.source = field, message, line, source
        where = f"{source}:{line}: " if source and line else (f"line {line}: " if line else "")
        super().__init__(f"{where}{field}: {message}")


@dataclass
class TenantSpec:
    name: str
    throughput: dict[str, float]
    weight: float = 1.0
    max_gpus: float | None = None
    jobs: list[tuple[str, int]] = field(default_factory=list)
    job_type: str = ""
    scale_factor: int = 0

    @property
    def cap(self) -> float:
        """The demand cap: max_gpus and the jobs' total GPUs, whichever is smaller."""
        caps = [c for c in (self.max_gpus, sum(g for _, g in self.jobs) if self.jobs else None) if c is not None]
        return min(caps) if caps else math.inf

    def to_dict(self) -> dict:
        return {"name": self.name, "weight": self.weight, "throughput": self.throughput,
                "max_gpus": self.max_gpus, "jobs": [{"id": j, "gpus": g} for j, g in self.jobs],
                "job_type": self.job_type, "scale_factor": self.scale_factor}


def _number(v, fld: str, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SpecError(fld, f"must be a finite number, got {v!r}")
    if v < minimum or (strict and v == minimum):
        raise SpecError(fld, f"must be {'>' if strict else '>='} {minimum:g}, got {v!r}")
    return float(v)


def _name(v, fld: str) -> str:
    if not isinstance(v, str) or not NAME.match(v):
        raise SpecError(fld, f"must match {NAME.pattern}, got {v!r}")
    return v


def parse_inventory(gpus, fld: str = "gpus") -> dict[str, int]:
    if not isinstance(gpus, dict) or not gpus:
        raise SpecError(fld, "must be a non-empty mapping of GPU type to count")
    out = {}
    for k, v in gpus.items():
        _name(k, f"{fld}.{k}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SpecError(f"{fld}.{k}", f"must be a whole number >= 0, got {v!r}")
        out[k] = v
    return out


def parse_prices(prices, types, fld: str = "prices") -> dict[str, float] | None:
    if prices is None or prices == {}:
        return None
    if not isinstance(prices, dict):
        raise SpecError(fld, "must be a mapping of GPU type to price")
    for k, v in prices.items():
        if k not in types:
            raise SpecError(f"{fld}.{k}", f"unknown GPU type (inventory: {', '.join(types)})")
        _number(v, f"{fld}.{k}", strict=True)
    return {k: float(v) for k, v in prices.items()}


def parse_tenant(d, fld: str = "tenant", types: list[str] | None = None) -> TenantSpec:
    """A tenant from a dict; ``types`` (if given) restricts throughput keys."""
    if not isinstance(d, dict):
        raise SpecError(fld, "must be a mapping")
    known = {"name", "weight", "throughput", "max_gpus", "jobs", "job_type", "scale_factor"}
    for k in d:
        if k not in known:
            raise SpecError(f"{fld}.{k}", f"unknown field (known: {', '.join(sorted(known))})")
    name = _name(d.get("name"), f"{fld}.name")
    weight = 1.0 if d.get("weight") is None else _number(d["weight"], f"{fld}.weight", strict=True)
    job_type, scale = d.get("job_type") or "", d.get("scale_factor") or 0
    if d.get("throughput") and job_type:
        raise SpecError(f"{fld}.job_type", "give either throughput or job_type, not both")
    if job_type:
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 0:
            raise SpecError(f"{fld}.scale_factor", f"must be a whole number >= 1, got {scale!r}")
        try:
            thr = gavel.throughput(job_type, scale or 1)
        except KeyError as e:
            raise SpecError(f"{fld}.job_type", e.args[0]) from None
        thr = {g: v for g, v in thr.items() if types is None or g in types}
    else:
        raw = d.get("throughput")
        if not isinstance(raw, dict) or not raw:
            raise SpecError(f"{fld}.throughput", "required (a mapping of GPU type to throughput per GPU) "
                            "unless job_type is given")
        thr = {}
        for g, v in raw.items():
            if types is not None and g not in types:
                raise SpecError(f"{fld}.throughput.{g}", f"unknown GPU type (inventory: {', '.join(types)})")
            thr[_name(g, f"{fld}.throughput.{g}")] = _number(v, f"{fld}.throughput.{g}")
    if not any(v > 0 for v in thr.values()):
        raise SpecError(f"{fld}.throughput", "needs a positive throughput on at least one GPU type")
    cap = d.get("max_gpus")
    cap = None if cap is None else _number(cap, f"{fld}.max_gpus")
    jobs, seen = [], set()
    for n, j in enumerate(d.get("jobs") or []):
        jf = f"{fld}.jobs[{n}]"
        if not isinstance(j, dict):
            raise SpecError(jf, "must be a mapping with id and gpus")
        jid = _name(j.get("id"), f"{jf}.id")
        if jid in seen:
            raise SpecError(f"{jf}.id", f"duplicate job id {jid!r}")
        seen.add(jid)
        g = j.get("gpus", 1)
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise SpecError(f"{jf}.gpus", f"must be a whole number >= 1, got {g!r}")
        jobs.append((jid, g))
    return TenantSpec(name, thr, weight, cap, jobs, job_type, scale)


def build_problem(gpus: dict[str, int], tenants: list[TenantSpec],
                  prices: dict[str, float] | None = None) -> Problem:
    return Problem.build(gpus, [{"name": t.name, "weight": t.weight, "throughput": t.throughput,
                                 "max_gpus": None if math.isinf(t.cap) else t.cap} for t in tenants], prices)


def _lines(node, path=(), out=None) -> dict[tuple, int]:
    """Map every field path in a composed YAML tree to its 1-based line."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            _lines(v, path + (k.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, path + (i,), out)
    return out


def _line_of(lines: dict[tuple, int], fld: str) -> int | None:
    parts: list = []
    for tok in re.findall(r"[^.\[\]]+|\[\d+\]", fld):
        parts.append(int(tok[1:-1]) if tok.startswith("[") else tok)
    while parts:
        if tuple(parts) in lines:
            return lines[tuple(parts)]
        parts.pop()
    return None


def load(text: str, source: str = "<input>") -> tuple[Problem, list[TenantSpec]]:
    """Parse a YAML allocation file; SpecError names the field and line."""
    try:   # parsed once (libyaml's C parser where present): the nodes give the lines, then the data
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SpecError("yaml", str(getattr(e, "problem", e)), mark.line + 1 if mark else None, source) from None
    lines = _lines(node) if node is not None else {}
    try:
        if not isinstance(data, dict):
            raise SpecError("file", "must be a mapping with gpus and tenants")
        for k in data:
            if k not in ("gpus", "tenants", "prices"):
                raise SpecError(str(k), "unknown top-level field (known: gpus, prices, tenants)")
        gpus = parse_inventory(data.get("gpus"))
        prices = parse_prices(data.get("prices"), list(gpus))
        raw = data.get("tenants")
        if not isinstance(raw, list) or not raw:
            raise SpecError("tenants", "must be a non-empty list")
        tenants, names = [], set()
        for i, t in enumerate(raw):
            spec = parse_tenant(t, f"tenants[{i}]", list(gpus))
            if spec.name in names:
                raise SpecError(f"tenants[{i}].name", f"duplicate tenant name {spec.name!r}")
            names.add(spec.name)
            tenants.append(spec)
        return build_problem(gpus, tenants, prices), tenants
    except SpecError as e:
        raise SpecError(e.field, e.message, _line_of(lines, e.field), source) from None
