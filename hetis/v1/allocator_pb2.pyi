from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SetInventoryRequest(_message.Message):
    __slots__ = ("gpus", "prices")
    class GpusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PricesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GPUS_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.ScalarMap[str, int]
    prices: _containers.ScalarMap[str, float]
    def __init__(self, gpus: _Optional[_Mapping[str, int]] = ..., prices: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SetInventoryResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "gpus")
    ID_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    id: str
    gpus: int
    def __init__(self, id: _Optional[str] = ..., gpus: _Optional[int] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("name", "weight", "throughput", "job_type", "scale_factor", "max_gpus", "jobs")
    class ThroughputEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_GPUS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    throughput: _containers.ScalarMap[str, float]
    job_type: str
    scale_factor: int
    max_gpus: float
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., throughput: _Optional[_Mapping[str, float]] = ..., job_type: _Optional[str] = ..., scale_factor: _Optional[int] = ..., max_gpus: _Optional[float] = ..., jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class UpsertTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class UpsertTenantResponse(_message.Message):
    __slots__ = ("version", "created")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    version: int
    created: bool
    def __init__(self, version: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class RemoveTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveTenantResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetAllocationRequest(_message.Message):
    __slots__ = ("mode",)
    MODE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    def __init__(self, mode: _Optional[str] = ...) -> None: ...

class TenantAllocation(_message.Message):
    __slots__ = ("tenant", "gpus", "utility", "sharing_incentive", "envy_free")
    class GpusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    UTILITY_FIELD_NUMBER: _ClassVar[int]
    SHARING_INCENTIVE_FIELD_NUMBER: _ClassVar[int]
    ENVY_FREE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    gpus: _containers.ScalarMap[str, float]
    utility: float
    sharing_incentive: bool
    envy_free: bool
    def __init__(self, tenant: _Optional[str] = ..., gpus: _Optional[_Mapping[str, float]] = ..., utility: _Optional[float] = ..., sharing_incentive: _Optional[bool] = ..., envy_free: _Optional[bool] = ...) -> None: ...

class Allocation(_message.Message):
    __slots__ = ("mode", "version", "tenants", "efficiency", "inventory", "solve_seconds", "outcome")
    class InventoryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    SOLVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    mode: str
    version: int
    tenants: _containers.RepeatedCompositeFieldContainer[TenantAllocation]
    efficiency: float
    inventory: _containers.ScalarMap[str, int]
    solve_seconds: float
    outcome: Outcome
    def __init__(self, mode: _Optional[str] = ..., version: _Optional[int] = ..., tenants: _Optional[_Iterable[_Union[TenantAllocation, _Mapping]]] = ..., efficiency: _Optional[float] = ..., inventory: _Optional[_Mapping[str, int]] = ..., solve_seconds: _Optional[float] = ..., outcome: _Optional[_Union[Outcome, _Mapping]] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("stage", "solver", "optimality_gap", "pareto_efficient", "implementable", "si_fraction")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    OPTIMALITY_GAP_FIELD_NUMBER: _ClassVar[int]
    PARETO_EFFICIENT_FIELD_NUMBER: _ClassVar[int]
    IMPLEMENTABLE_FIELD_NUMBER: _ClassVar[int]
    SI_FRACTION_FIELD_NUMBER: _ClassVar[int]
    stage: str
    solver: str
    optimality_gap: float
    pareto_efficient: bool
    implementable: bool
    si_fraction: float
    def __init__(self, stage: _Optional[str] = ..., solver: _Optional[str] = ..., optimality_gap: _Optional[float] = ..., pareto_efficient: _Optional[bool] = ..., implementable: _Optional[bool] = ..., si_fraction: _Optional[float] = ...) -> None: ...

class WatchAllocationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Grant(_message.Message):
    __slots__ = ("tenant", "job_id", "gpu_type", "gpus", "lease_expires_unix", "extended")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXTENDED_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job_id: str
    gpu_type: str
    gpus: int
    lease_expires_unix: float
    extended: bool
    def __init__(self, tenant: _Optional[str] = ..., job_id: _Optional[str] = ..., gpu_type: _Optional[str] = ..., gpus: _Optional[int] = ..., lease_expires_unix: _Optional[float] = ..., extended: _Optional[bool] = ...) -> None: ...

class TenantRound(_message.Message):
    __slots__ = ("tenant", "gpus", "received", "target")
    class GpusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ReceivedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TargetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    gpus: _containers.ScalarMap[str, int]
    received: _containers.ScalarMap[str, float]
    target: _containers.ScalarMap[str, float]
    def __init__(self, tenant: _Optional[str] = ..., gpus: _Optional[_Mapping[str, int]] = ..., received: _Optional[_Mapping[str, float]] = ..., target: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("round", "started_unix", "version", "mode", "grants", "tenants", "moves")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    round: int
    started_unix: float
    version: int
    mode: str
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantRound]
    moves: int
    def __init__(self, round: _Optional[int] = ..., started_unix: _Optional[float] = ..., version: _Optional[int] = ..., mode: _Optional[str] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., tenants: _Optional[_Iterable[_Union[TenantRound, _Mapping]]] = ..., moves: _Optional[int] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("mode", "tenants")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mode: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class TenantExplanation(_message.Message):
    __slots__ = ("tenant", "utility", "equal_share_utility", "si_slack", "ef_slack", "most_envied", "speedup", "gpus")
    class SpeedupEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class GpusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    UTILITY_FIELD_NUMBER: _ClassVar[int]
    EQUAL_SHARE_UTILITY_FIELD_NUMBER: _ClassVar[int]
    SI_SLACK_FIELD_NUMBER: _ClassVar[int]
    EF_SLACK_FIELD_NUMBER: _ClassVar[int]
    MOST_ENVIED_FIELD_NUMBER: _ClassVar[int]
    SPEEDUP_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    utility: float
    equal_share_utility: float
    si_slack: float
    ef_slack: float
    most_envied: str
    speedup: _containers.ScalarMap[str, float]
    gpus: _containers.ScalarMap[str, float]
    def __init__(self, tenant: _Optional[str] = ..., utility: _Optional[float] = ..., equal_share_utility: _Optional[float] = ..., si_slack: _Optional[float] = ..., ef_slack: _Optional[float] = ..., most_envied: _Optional[str] = ..., speedup: _Optional[_Mapping[str, float]] = ..., gpus: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("mode", "version", "efficiency", "tenants", "outcome")
    MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    mode: str
    version: int
    efficiency: float
    tenants: _containers.RepeatedCompositeFieldContainer[TenantExplanation]
    outcome: Outcome
    def __init__(self, mode: _Optional[str] = ..., version: _Optional[int] = ..., efficiency: _Optional[float] = ..., tenants: _Optional[_Iterable[_Union[TenantExplanation, _Mapping]]] = ..., outcome: _Optional[_Union[Outcome, _Mapping]] = ...) -> None: ...
