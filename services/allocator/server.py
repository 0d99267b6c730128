"""The `hetis.v1.Allocator` servicer: each RPC converts its request with
hetis.allocator.wire, calls the runtime (hetis.allocator.runtime) and converts the
answer back. Library errors become status codes, the message starting with the
field: SpecError -> INVALID_ARGUMENT, NotFound -> NOT_FOUND."""
from __future__ import annotations

import contextlib

import grpc

from hetis.allocator import wire
from hetis.allocator.runtime import AllocatorRuntime, NotFound
from hetis.allocator.spec import SpecError
from hetis.v1 import allocator_pb2 as pb
from hetis.v1 import allocator_pb2_grpc


@contextlib.contextmanager
def status(context):
    try:
        yield
    except SpecError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except NotFound as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))


class Allocator(allocator_pb2_grpc.AllocatorServicer):
    def __init__(self, runtime: AllocatorRuntime):
        self.runtime = runtime

    def SetInventory(self, request, context):
        with status(context):
            version = self.runtime.set_inventory(*wire.inventory_from_pb(request))
        return pb.SetInventoryResponse(version=version)

    def UpsertTenant(self, request, context):
        with status(context):
            version, created = self.runtime.upsert_tenant(wire.tenant_from_pb(request))
        return pb.UpsertTenantResponse(version=version, created=created)

    def RemoveTenant(self, request, context):
        with status(context):
            version = self.runtime.remove_tenant(wire.tenant_name_from_pb(request))
        return pb.RemoveTenantResponse(version=version)

    def GetAllocation(self, request, context):
        with status(context):
            snap, alloc = self.runtime.solve(request.mode)
        return wire.allocation_to_pb(snap, request.mode or snap.mode, alloc)

    def Explain(self, request, context):
        with status(context):
            snap, alloc = self.runtime.solve(request.mode)
            snap.require(request.tenants)
        return wire.explain_to_pb(snap, request.mode or snap.mode, alloc, request.tenants)

    def WatchAllocation(self, request, context):
        seen = 0
        while context.is_active() and not self.runtime.stopping.is_set():
            res, snap = self.runtime.wait_round_and_snapshot(seen)
            if res is not None:
                seen = res.round
                yield wire.round_to_pb(res, snap)
