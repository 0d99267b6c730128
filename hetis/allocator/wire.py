"""hetis.v1.Allocator messages <-> library values, both directions, in one place
(protos/hetis/v1/allocator.proto is the contract).

Requests become the same validated values a YAML file gives (spec.py), so a bad
field raises a SpecError whose message starts with the field path
(``tenant.throughput.v100: must be >= 0``); the servicer turns it into
INVALID_ARGUMENT. Responses are built from a runtime `Snapshot`, an `Allocation`
and a `RoundResult`, with the utilities and slacks of problem.py (the CLI's
numbers). The proto's zero values stand for "unset": weight 0 is the default 1,
an empty mode the service's own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hetis.v1 import allocator_pb2 as pb

from .problem import (
    FAIR_TOL,
    ef_slack,
    equal_share_values,
    most_envied,
    si_slack,
    utilities,
)
from .spec import SpecError, TenantSpec, parse_inventory, parse_prices, parse_tenant

if TYPE_CHECKING:
    from .problem import Allocation
    from .rounds import RoundResult
    from .runtime import Snapshot


# ---------------------------------------------------------------- requests

def inventory_from_pb(req: pb.SetInventoryRequest) -> tuple[dict[str, int], dict[str, float] | None]:
    gpus = parse_inventory(dict(req.gpus), "gpus")
    return gpus, parse_prices(dict(req.prices), list(gpus), "prices")


def tenant_from_pb(req: pb.UpsertTenantRequest) -> TenantSpec:
    if not req.HasField("tenant"):
        raise SpecError("tenant", "required")
    t = req.tenant
    if t.weight < 0:
        raise SpecError("tenant.weight", f"must be > 0, got {t.weight}")
    return parse_tenant({"name": t.name, "weight": t.weight or None, "throughput": dict(t.throughput),
                         "job_type": t.job_type, "scale_factor": t.scale_factor,
                         "max_gpus": t.max_gpus if t.HasField("max_gpus") else None,
                         "jobs": [{"id": j.id, "gpus": j.gpus} for j in t.jobs]}, "tenant")


def tenant_name_from_pb(req: pb.RemoveTenantRequest) -> str:
    if not req.name:
        raise SpecError("name", "required")
    return req.name


# ---------------------------------------------------------------- responses

def allocation_to_pb(snap: Snapshot, mode: str, alloc: Allocation | None) -> pb.Allocation:
    out = pb.Allocation(mode=mode, version=snap.version, inventory=snap.gpus)
    if alloc is None:
        return out
    p = snap.problem
    u, si, ef = utilities(p, alloc.x), si_slack(p, alloc.x), ef_slack(p, alloc.x)
    for i, name in enumerate(p.tenants):
        out.tenants.add(tenant=name, gpus=dict(zip(p.gpu_types, map(float, alloc.x[i]))),
                        utility=float(u[i]), sharing_incentive=bool(si[i] >= -FAIR_TOL),
                        envy_free=bool(ef[i] >= -FAIR_TOL))
    out.efficiency, out.solve_seconds = float(u.sum()), alloc.solve_seconds
    out.outcome.CopyFrom(outcome_to_pb(alloc))
    return out


def outcome_to_pb(alloc: Allocation) -> pb.Outcome:
    o = alloc.outcome()
    return pb.Outcome(stage=o["stage"], solver=o["solver"], optimality_gap=o["optimality_gap"],
                      pareto_efficient=o["pareto_efficient"], implementable=o["implementable"],
                      si_fraction=o["si_fraction"])


def explain_to_pb(snap: Snapshot, mode: str, alloc: Allocation | None, tenants) -> pb.ExplainResponse:
    """Every tenant of the problem, or only ``tenants`` if any are named."""
    out = pb.ExplainResponse(mode=mode, version=snap.version)
    if alloc is None:
        return out
    p, x = snap.problem, alloc.x
    u, base = utilities(p, x), equal_share_values(p)
    si, ef, envied = si_slack(p, x), ef_slack(p, x), most_envied(p, x)
    want = set(tenants) or set(p.tenants)
    for i, name in enumerate(p.tenants):
        if name in want:
            out.tenants.add(tenant=name, utility=float(u[i]), equal_share_utility=float(base[i]),
                            si_slack=float(si[i]), ef_slack=float(ef[i]), most_envied=envied[i],
                            speedup=dict(zip(p.gpu_types, map(float, p.speedup[i]))),
                            gpus=dict(zip(p.gpu_types, map(float, x[i]))))
    out.efficiency = float(u.sum())
    out.outcome.CopyFrom(outcome_to_pb(alloc))
    return out


def round_to_pb(res: RoundResult, snap: Snapshot) -> pb.Round:
    msg = pb.Round(round=res.round, started_unix=res.started, version=snap.version, mode=snap.mode,
                   moves=res.moves)
    for g in res.grants:
        msg.grants.add(tenant=g.tenant, job_id=g.job_id, gpu_type=g.gpu_type, gpus=g.gpus,
                       lease_expires_unix=g.lease_expires, extended=g.extended)
    for t, counts in res.per_tenant.items():
        msg.tenants.add(tenant=t, gpus=counts, received=res.received[t], target=res.target[t])
    return msg
