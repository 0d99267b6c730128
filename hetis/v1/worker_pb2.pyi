from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChunkSpec(_message.Message):
    __slots__ = ("seq_id", "start", "token_ids", "sample", "temperature", "top_p", "top_k", "seed")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, seq_id: _Optional[int] = ..., start: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class AttnItemSpec(_message.Message):
    __slots__ = ("seq_id", "group", "start", "num_new", "blocks")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    NUM_NEW_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    group: int
    start: int
    num_new: int
    blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[int] = ..., group: _Optional[int] = ..., start: _Optional[int] = ..., num_new: _Optional[int] = ..., blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class BackendWork(_message.Message):
    __slots__ = ("backend", "items")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    backend: int
    items: _containers.RepeatedCompositeFieldContainer[AttnItemSpec]
    def __init__(self, backend: _Optional[int] = ..., items: _Optional[_Iterable[_Union[AttnItemSpec, _Mapping]]] = ...) -> None: ...

class KVMoveSpec(_message.Message):
    __slots__ = ("seq_id", "group", "src", "dst", "num_tokens", "src_blocks", "dst_blocks", "partial")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SRC_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    group: int
    src: int
    dst: int
    num_tokens: int
    src_blocks: _containers.RepeatedScalarFieldContainer[int]
    dst_blocks: _containers.RepeatedScalarFieldContainer[int]
    partial: bool
    def __init__(self, seq_id: _Optional[int] = ..., group: _Optional[int] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., num_tokens: _Optional[int] = ..., src_blocks: _Optional[_Iterable[int]] = ..., dst_blocks: _Optional[_Iterable[int]] = ..., partial: _Optional[bool] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "chunks", "work", "freed_seq_ids", "moves")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    FREED_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkSpec]
    work: _containers.RepeatedCompositeFieldContainer[BackendWork]
    freed_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    moves: _containers.RepeatedCompositeFieldContainer[KVMoveSpec]
    def __init__(self, step_id: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkSpec, _Mapping]]] = ..., work: _Optional[_Iterable[_Union[BackendWork, _Mapping]]] = ..., freed_seq_ids: _Optional[_Iterable[int]] = ..., moves: _Optional[_Iterable[_Union[KVMoveSpec, _Mapping]]] = ...) -> None: ...

class StepTimings(_message.Message):
    __slots__ = ("total_s", "dense_s", "local_attn_s", "exchange_wait_s", "move_s")
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    DENSE_S_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ATTN_S_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    MOVE_S_FIELD_NUMBER: _ClassVar[int]
    total_s: float
    dense_s: float
    local_attn_s: float
    exchange_wait_s: float
    move_s: float
    def __init__(self, total_s: _Optional[float] = ..., dense_s: _Optional[float] = ..., local_attn_s: _Optional[float] = ..., exchange_wait_s: _Optional[float] = ..., move_s: _Optional[float] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step_id", "token_ids", "timings")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    timings: StepTimings
    def __init__(self, step_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[StepTimings, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttentionPeer(_message.Message):
    __slots__ = ("id", "address", "device", "kv_tokens", "latency_s", "bandwidth_bps", "lost")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    device: str
    kv_tokens: int
    latency_s: float
    bandwidth_bps: float
    lost: bool
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., kv_tokens: _Optional[int] = ..., latency_s: _Optional[float] = ..., bandwidth_bps: _Optional[float] = ..., lost: _Optional[bool] = ...) -> None: ...

class DenseInfo(_message.Message):
    __slots__ = ("id", "model", "dtype", "device", "num_layers", "num_kv_heads", "q_per_group", "head_dim", "block_size", "kv_tokens", "peers", "backend", "incarnation")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    Q_PER_GROUP_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    dtype: str
    device: str
    num_layers: int
    num_kv_heads: int
    q_per_group: int
    head_dim: int
    block_size: int
    kv_tokens: int
    peers: _containers.RepeatedCompositeFieldContainer[AttentionPeer]
    backend: str
    incarnation: str
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., q_per_group: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[AttentionPeer, _Mapping]]] = ..., backend: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("attn_addresses", "renew")
    ATTN_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    RENEW_FIELD_NUMBER: _ClassVar[int]
    attn_addresses: _containers.RepeatedScalarFieldContainer[str]
    renew: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, attn_addresses: _Optional[_Iterable[str]] = ..., renew: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("master_addr", "master_port", "rank", "world_size", "backend", "num_layers", "q_per_group", "head_dim", "block_size", "dtype", "group_id", "peer")
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    Q_PER_GROUP_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    master_addr: str
    master_port: int
    rank: int
    world_size: int
    backend: str
    num_layers: int
    q_per_group: int
    head_dim: int
    block_size: int
    dtype: str
    group_id: str
    peer: str
    def __init__(self, master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., backend: _Optional[str] = ..., num_layers: _Optional[int] = ..., q_per_group: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ..., group_id: _Optional[str] = ..., peer: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("id", "kv_tokens", "device")
    ID_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    id: str
    kv_tokens: int
    device: str
    def __init__(self, id: _Optional[str] = ..., kv_tokens: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttnStats(_message.Message):
    __slots__ = ("id", "device", "kv_total_tokens", "kv_used_tokens", "resident_seq_ids", "resident_groups", "cost_per_token", "cost_per_group", "steps", "joined")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KV_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_GROUPS_FIELD_NUMBER: _ClassVar[int]
    COST_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COST_PER_GROUP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    id: str
    device: str
    kv_total_tokens: int
    kv_used_tokens: int
    resident_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    resident_groups: _containers.RepeatedScalarFieldContainer[int]
    cost_per_token: float
    cost_per_group: float
    steps: int
    joined: bool
    def __init__(self, id: _Optional[str] = ..., device: _Optional[str] = ..., kv_total_tokens: _Optional[int] = ..., kv_used_tokens: _Optional[int] = ..., resident_seq_ids: _Optional[_Iterable[int]] = ..., resident_groups: _Optional[_Iterable[int]] = ..., cost_per_token: _Optional[float] = ..., cost_per_group: _Optional[float] = ..., steps: _Optional[int] = ..., joined: _Optional[bool] = ...) -> None: ...
