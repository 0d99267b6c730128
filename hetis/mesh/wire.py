"""Every conversion between the mesh's protos and the library's values, both directions.

One module, so a field is mapped once: the SDK and the router agree on
sampling parameters because both call this file; the router builds a
``StepRequest`` and the dense worker reads it back here, side by side.

==============================  ======================================  ======================
proto (hetis/v1)                library value                           who converts which way
==============================  ======================================  ======================
generation.SamplingParams       hetis.SamplingParams                    SDK ->, router <-
GenerateRequest / ChatRequest   prompt text or ids, chat messages       SDK ->, router <-
GenerateChunk                   engine.StepOutput -> ``Chunk``          router ->, SDK <-
ModelInfo, ClusterStatus        ModelConfig, engine.EngineSnapshot      router ->, SDK <- dict
worker.StepRequest              engine.step.Step                        router ->, dense <-
worker.StepResponse             sampled tokens + engine.step.StepTimes  dense ->, router <-
worker.DenseInfo                engine.dispatcher.Device list           dense ->, router <-
worker.JoinRequest              ``AttentionShape`` + rendezvous         dense ->, attention <-
==============================  ======================================  ======================

Bad input raises ``ParamError`` naming the field (the services answer
INVALID_ARGUMENT with its message; the SDK raises ``InvalidArgument``).
Nothing here imports torch: the SDK and CLI load this file.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from hetis.defaults import DTYPE_NAMES
from hetis.engine.sampling import ParamError, SamplingParams
from hetis.engine.step import AttnItem, KVMove, Step, StepChunk, StepTimes
from hetis.model.tokenizer import validate_messages
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import worker_pb2 as wpb

SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams) if f.init)
MAX_TOKEN_ID = 2 ** 31  # token ids are int32 on the wire


# ------------------------------------------------------------------ sampling
def sampling_to_proto(sampling: dict) -> pb.SamplingParams:
    """Check keywords like ``SamplingParams(**sampling)``; map the given ones to the proto.

    Fields not given stay unset, so the router applies the same defaults.
    An unknown keyword is a TypeError, as for a function call.
    """
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling keyword argument(s): {', '.join(unknown)} "
                        f"(valid: {', '.join(SAMPLING_FIELDS)})")
    p = SamplingParams(**sampling)
    msg = pb.SamplingParams(stop=p.stop_list, stop_token_ids=p.stop_token_ids,
                            ignore_eos=p.ignore_eos)
    for name in ("temperature", "top_p", "top_k", "max_tokens"):
        if name in sampling:
            setattr(msg, name, getattr(p, name))
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def sampling_from_proto(sp: pb.SamplingParams) -> SamplingParams:
    """Proto -> SamplingParams; unset optional fields take SamplingParams' defaults."""
    kw = {f: getattr(sp, f) for f in ("temperature", "top_p", "top_k", "max_tokens", "seed")
          if sp.HasField(f)}
    if kw.get("seed", 0) >= 2 ** 63:
        raise ParamError("sampling.seed", "must be < 2**63")
    try:
        return SamplingParams(stop=list(sp.stop) or None,
                              stop_token_ids=list(sp.stop_token_ids) or None,
                              ignore_eos=sp.ignore_eos, **kw)
    except ParamError as e:
        raise ParamError(f"sampling.{e.param}", e.reason) from None


# ------------------------------------------------------------------ requests (SDK -> router)
def _request_id(request_id) -> str:
    if request_id is None:
        return ""  # the router makes one
    if not isinstance(request_id, str):
        raise ParamError("request_id", "must be a string")
    return request_id


def generate_request(prompt, prompt_token_ids, request_id, sampling: dict) -> pb.GenerateRequest:
    if (prompt is None) == (prompt_token_ids is None):
        raise ParamError("prompt", "give exactly one of prompt or prompt_token_ids")
    req = pb.GenerateRequest(request_id=_request_id(request_id), sampling=sampling_to_proto(sampling))
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ParamError("prompt", f"must be a string (got {type(prompt).__name__})")
        req.prompt = prompt
    else:
        ids = list(prompt_token_ids) if isinstance(prompt_token_ids, (list, tuple)) else None
        if not ids or any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < MAX_TOKEN_ID
                          for t in ids):
            raise ParamError("prompt_token_ids", "must be a non-empty list of non-negative "
                             f"integers (got {prompt_token_ids!r:.80})")
        req.prompt_token_ids.ids.extend(ids)
    return req


def chat_messages_to_proto(messages) -> list[pb.ChatMessage]:
    validate_messages(messages)  # ParamError naming the message and field
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def chat_request(messages, request_id, sampling: dict) -> pb.ChatRequest:
    return pb.ChatRequest(request_id=_request_id(request_id), messages=chat_messages_to_proto(messages),
                          sampling=sampling_to_proto(sampling))


def tokenize_request(text, messages) -> pb.TokenizeRequest:
    if (text is None) == (messages is None):
        raise ParamError("text", "give exactly one of text or messages")
    if messages is not None:
        return pb.TokenizeRequest(messages=chat_messages_to_proto(messages))
    if not isinstance(text, str):
        raise ParamError("text", f"must be a string (got {type(text).__name__})")
    return pb.TokenizeRequest(text=text)


def prompt_from_request(req: pb.GenerateRequest) -> tuple[str | None, list[int] | None]:
    """(prompt text, None) or (None, prompt token ids) of a GenerateRequest."""
    which = req.WhichOneof("input")
    if which == "prompt":
        if not req.prompt:
            raise ParamError("prompt", "must not be empty")
        return req.prompt, None
    if which == "prompt_token_ids":
        if not req.prompt_token_ids.ids:
            raise ParamError("prompt_token_ids", "must not be empty")
        return None, list(req.prompt_token_ids.ids)
    raise ParamError("prompt", "give prompt or prompt_token_ids")


def messages_from_proto(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


# ------------------------------------------------------------------ results (router -> SDK)
@dataclass
class Chunk:
    """One streamed piece: the tokens and text since the previous chunk."""
    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    """A whole generation (what ``Client.generate`` and ``Client.chat`` return)."""
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, c: Chunk) -> None:
        self.request_id = c.request_id or self.request_id
        self.text += c.text
        self.token_ids.extend(c.token_ids)
        self.prompt_tokens = c.prompt_tokens or self.prompt_tokens
        self.completion_tokens = c.completion_tokens or len(self.token_ids)
        if c.finished:
            self.finish_reason = c.finish_reason or None


def chunk_to_proto(out, request_id: str) -> pb.GenerateChunk:
    """An engine ``StepOutput`` as the chunk streamed to the client (its value fields
    only: the sequence itself belongs to the serving loop's thread)."""
    return pb.GenerateChunk(
        request_id=request_id, token_ids=out.new_token_ids, text=out.text_delta,
        finished=out.finished, finish_reason=(out.finish_reason or "") if out.finished else "",
        prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens)


def chunk_from_proto(m: pb.GenerateChunk) -> Chunk:
    return Chunk(m.request_id, m.text, list(m.token_ids), m.finished, m.finish_reason or None,
                 m.prompt_tokens, m.completion_tokens)


def message_to_dict(m) -> dict:
    """A proto message as plain Python values (ints stay ints, all fields present)."""
    out = {}
    for f in m.DESCRIPTOR.fields:
        v = getattr(m, f.name)
        is_msg = f.message_type is not None
        if f.is_repeated:
            out[f.name] = [message_to_dict(x) if is_msg else x for x in v]
        else:
            out[f.name] = message_to_dict(v) if is_msg else v
    return out


def model_info_to_proto(cfg, name: str, dtype: str, max_model_len: int, tokenizer) -> pb.ModelInfo:
    return pb.ModelInfo(name=name, dtype=dtype, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                        vocab_size=cfg.vocab_size, max_model_len=max_model_len,
                        eos_token_ids=list(tokenizer.eos_token_ids),
                        has_chat_template=bool(tokenizer.chat_template))


def cluster_status_to_proto(snap, model: str, device_ids: list[str], kinds: dict[str, str],
                            workers: dict[str, dict], steps) -> pb.ClusterStatus:
    """The engine's snapshot (placement, KV, load: the router's truth), with each worker's
    liveness, device and address from Redis (a device the router lost is shown dead until
    it rejoins), each dense worker's steps and batch, and the router's step breakdown."""
    st = pb.ClusterStatus(policy=snap.policy, waiting=snap.waiting, running=snap.running, model=model,
                          steps=pb.StepBreakdown(
                              steps=steps.steps, step_call_s=steps.rpc_s,
                              dense_worker_s=steps.dense_total_s, dense_compute_s=steps.dense_s,
                              local_attn_s=steps.local_attn_s, exchange_wait_s=steps.exchange_wait_s,
                              move_s=steps.move_s),
                          migrations=snap.migrations, migrated_bytes=snap.migrated_bytes,
                          preemptions=snap.preemptions)
    instances = {i.name: i for i in snap.instances}
    for wid, dev in zip(device_ids, snap.devices):
        w = workers.get(wid, {})
        ws = st.workers.add(id=wid, kind=w.get("kind", kinds.get(wid, "")),
                            device=w.get("device", ""), address=w.get("address", ""),
                            alive=w.get("alive", False) and not dev.lost, kv_used_tokens=dev.used_tokens,
                            kv_total_tokens=dev.total_tokens, load=dev.load,
                            cost_per_token=dev.cost_per_token)
        inst = instances.get(wid)
        if inst is not None and kinds.get(wid) == "dense":
            ws.steps, ws.running, ws.waiting = inst.steps, inst.running, inst.waiting
        for rid, groups in dev.resident.items():
            ws.resident.add(request_id=rid, groups=groups)
    return st


# ------------------------------------------------------------------ the step (router <-> dense)
def step_to_proto(step: Step, step_id: int) -> wpb.StepRequest:
    req = wpb.StepRequest(step_id=step_id, freed_seq_ids=list(step.freed))
    for c in step.chunks:
        spec = req.chunks.add(seq_id=c.seq_id, start=c.start, token_ids=c.token_ids, sample=c.sample)
        if c.sample:
            p = c.params
            spec.temperature, spec.top_p, spec.top_k = p.temperature, p.top_p, p.top_k
            if p.seed is not None:
                spec.seed = p.seed
    for b, items in enumerate(step.work):
        if items:
            w = req.work.add(backend=b)
            for it in items:
                w.items.add(seq_id=it.seq_id, group=it.group, start=it.start, num_new=it.num_new,
                            blocks=it.blocks)
    for m in step.moves:
        req.moves.add(seq_id=m.seq_id, group=m.group, src=m.src, dst=m.dst, num_tokens=m.num_tokens,
                      src_blocks=m.src_blocks, dst_blocks=m.dst_blocks, partial=m.partial)
    return req


def step_from_proto(req: wpb.StepRequest, num_backends: int) -> Step:
    """The Step a dense worker with ``num_backends`` backends executes. Sampling chunks carry
    their seed in ``params.seed`` (a draw depends on seed and position only)."""
    chunks = []
    for i, c in enumerate(req.chunks):
        if not c.token_ids:
            raise ParamError(f"chunks[{i}].token_ids", "empty")
        params = None
        if c.sample:
            try:
                params = SamplingParams(temperature=c.temperature, top_p=c.top_p or 1.0,
                                        top_k=c.top_k or -1,
                                        seed=c.seed if c.HasField("seed") else None)
            except ParamError as e:
                raise ParamError(f"chunks[{i}].{e.param}", e.reason) from None
        chunks.append(StepChunk(c.seq_id, c.start, list(c.token_ids), c.sample, params))
    work: list[list[AttnItem]] = [[] for _ in range(num_backends)]
    for w in req.work:
        if w.backend >= num_backends:
            raise ParamError("work.backend", f"{w.backend} but only {num_backends} backends "
                             "are connected")
        work[w.backend] = [AttnItem(it.seq_id, it.group, it.start, it.num_new, list(it.blocks))
                           for it in w.items]
    moves = []
    for i, m in enumerate(req.moves):
        for name in ("src", "dst"):
            if getattr(m, name) >= num_backends:
                raise ParamError(f"moves[{i}].{name}", f"{getattr(m, name)} but only {num_backends} "
                                 "backends are connected")
        if m.src == m.dst or not m.num_tokens:
            raise ParamError(f"moves[{i}]", "a move needs two different backends and tokens")
        moves.append(KVMove(m.seq_id, m.group, m.src, m.dst, m.num_tokens, list(m.src_blocks),
                            list(m.dst_blocks), m.partial))
    return Step(chunks, work, list(req.freed_seq_ids), moves)


# A Step that failed because attention workers were lost says which backends, in its
# trailing metadata, so the router can recover (recompute what lived there) instead of
# failing the requests.
LOST_BACKENDS_KEY = "hetis-lost-backends"


def backends_to_metadata(backends: list[int]) -> str:
    return ",".join(map(str, backends))


def lost_backends_from_metadata(metadata) -> list[int]:
    for key, value in metadata or ():
        if key == LOST_BACKENDS_KEY:
            return [int(b) for b in value.split(",") if b]
    return []


def step_result_to_proto(step_id: int, tokens: list[int], t: StepTimes) -> wpb.StepResponse:
    return wpb.StepResponse(step_id=step_id, token_ids=tokens, timings=wpb.StepTimings(
        total_s=t.total, dense_s=t.dense, local_attn_s=t.local_attn, exchange_wait_s=t.exchange_wait,
        move_s=t.move))


def step_result_from_proto(resp: wpb.StepResponse) -> tuple[list[int], StepTimes]:
    t = resp.timings
    return list(resp.token_ids), StepTimes(t.total_s, t.local_attn_s, t.exchange_wait_s, t.move_s)


# ------------------------------------------------------------------ membership (dense <-> attention)
@dataclass
class AttentionShape:
    """What an attention worker must know of the model to hold its KV (no weights)."""
    num_layers: int
    q_per_group: int
    head_dim: int
    block_size: int
    dtype: str


@dataclass
class Rendezvous:
    """Where and how an attention worker joins the dense worker's tensor group."""
    master_addr: str
    master_port: int
    rank: int
    world_size: int
    backend: str        # "gloo" | "nccl"
    group_id: str
    peer: str = ""      # the joining end (dense worker id/incarnation/rank): a new one replaces


def join_to_proto(shape: AttentionShape, rv: Rendezvous) -> wpb.JoinRequest:
    return wpb.JoinRequest(master_addr=rv.master_addr, master_port=rv.master_port, rank=rv.rank,
                           world_size=rv.world_size, backend=rv.backend, group_id=rv.group_id,
                           peer=rv.peer, num_layers=shape.num_layers, q_per_group=shape.q_per_group,
                           head_dim=shape.head_dim, block_size=shape.block_size, dtype=shape.dtype)


def join_from_proto(req: wpb.JoinRequest) -> tuple[AttentionShape, Rendezvous]:
    if req.dtype not in DTYPE_NAMES:
        raise ParamError("dtype", f"must be one of {sorted(DTYPE_NAMES)}")
    if req.backend not in ("gloo", "nccl"):
        raise ParamError("backend", "must be 'gloo' or 'nccl'")
    for f in ("num_layers", "q_per_group", "head_dim", "block_size", "world_size", "rank"):
        if getattr(req, f) == 0:
            raise ParamError(f, "must be positive")
    return (AttentionShape(req.num_layers, req.q_per_group, req.head_dim, req.block_size, req.dtype),
            Rendezvous(req.master_addr, req.master_port, req.rank, req.world_size, req.backend,
                       req.group_id, req.peer))


@dataclass
class Peer:
    """An attention worker in a dense worker's tensor group, with its measured link."""
    id: str
    address: str
    device: str
    kv_tokens: int
    latency_s: float
    bandwidth_bps: float
    lost: bool = False


def dense_info_to_proto(wid: str, model: str, dtype: str, device: str, mc, block_size: int,
                        kv_tokens: int, peers: list[Peer], backend: str,
                        incarnation: str = "") -> wpb.DenseInfo:
    return wpb.DenseInfo(id=wid, model=model, dtype=dtype, device=device, num_layers=mc.num_layers,
                         num_kv_heads=mc.num_kv_heads, q_per_group=mc.q_per_group,
                         head_dim=mc.head_dim, block_size=block_size, kv_tokens=kv_tokens,
                         peers=[wpb.AttentionPeer(**vars(p)) for p in peers], backend=backend,
                         incarnation=incarnation)


def join_response_to_proto(wid: str, kv_tokens: int, device: str) -> wpb.JoinResponse:
    return wpb.JoinResponse(id=wid, kv_tokens=kv_tokens, device=device)


def attn_stats_to_proto(wid: str, device: str, kv_total: int, joined: bool, tel: dict,
                        resident: dict[int, list[int]]) -> wpb.AttnStats:
    return wpb.AttnStats(
        id=wid, device=device, kv_total_tokens=kv_total, kv_used_tokens=tel["kv_used_tokens"],
        resident_seq_ids=list(resident), resident_groups=[sum(1 << g for g in gs)
                                                          for gs in resident.values()],
        cost_per_token=tel.get("cost_per_token", 0.0), cost_per_group=tel.get("cost_per_group", 0.0),
        steps=tel["steps"], joined=joined)
