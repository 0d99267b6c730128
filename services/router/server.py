"""The public hetis.v1.Generation service and the router's start-up."""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import grpc

from hetis.config import EngineConfig
from hetis.dispatcher import Device, Dispatcher
from hetis.engine import Engine
from hetis.kv_cache import BlockManager
from hetis.loader import load_meta
from hetis.sampling import SamplingParams
from hetis.service import GRPC_OPTIONS, serve, setup_logging
from hetis.telemetry import connect, read_workers
from hetis.v1 import generation_pb2 as pb, generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from hetis.serving import QueueFull, ServingLoop
from services.router.core import RemoteExecutor

log = logging.getLogger("hetis.router")


def sampling_from_proto(sp: pb.SamplingParams) -> SamplingParams:
    """Proto -> SamplingParams; unset optional fields take SamplingParams' defaults."""
    kw = {}
    for f in ("temperature", "top_p", "top_k", "max_tokens", "seed"):
        if sp.HasField(f):
            kw[f] = getattr(sp, f)
    if "seed" in kw and kw["seed"] >= 2 ** 63:
        raise ValueError("sampling.seed: must be < 2**63")
    try:
        return SamplingParams(stop=list(sp.stop) or None, stop_token_ids=list(sp.stop_token_ids) or None,
                              ignore_eos=sp.ignore_eos, **kw)
    except ValueError as e:
        raise ValueError(f"sampling.{e}") from None


class Generation(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: ServingLoop, tokenizer, model_cfg, model_name: str, dtype: str,
                 dispatcher: Dispatcher, redis_url: str, device_ids: list[str]):
        self.core, self.tok, self.cfg = core, tokenizer, model_cfg
        self.model_name, self.dtype = model_name, dtype
        self.dispatcher, self.device_ids = dispatcher, device_ids
        self.redis = connect(redis_url)

    # ------------------------------------------------------------ generation
    def _stream(self, request_id: str, ids: list[int], sp: pb.SamplingParams, prompt, ctx):
        try:
            params = sampling_from_proto(sp)
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request_id or uuid.uuid4().hex
        try:
            out = self.core.submit(rid, ids, params, prompt)
        except QueueFull as e:
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        # a cancelled call or a gone client aborts the request and frees its KV
        finished = False
        ctx.add_callback(lambda: None if finished else self.core.abort(rid))
        try:
            while not finished:
                try:
                    o = out.get(timeout=1.0)
                except queue.Empty:
                    if not ctx.is_active():
                        return
                    continue
                if isinstance(o, Exception):
                    ctx.abort(grpc.StatusCode.UNAVAILABLE, str(o))
                finished = o.finished
                yield pb.GenerateChunk(
                    request_id=rid, token_ids=o.new_token_ids, text=o.text_delta, finished=finished,
                    finish_reason=(o.seq.finish_reason or "") if finished else "",
                    prompt_tokens=len(o.seq.prompt_token_ids),
                    completion_tokens=len(o.seq.output_token_ids))
        finally:
            if not finished:
                self.core.abort(rid)

    def Generate(self, req: pb.GenerateRequest, ctx):
        which = req.WhichOneof("input")
        if which == "prompt":
            if not req.prompt:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")
            ids, prompt = self.tok.encode(req.prompt), req.prompt
        elif which == "prompt_token_ids":
            ids, prompt = list(req.prompt_token_ids.ids), None
            if not ids:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: must not be empty")
        else:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: give prompt or prompt_token_ids")
        yield from self._stream(req.request_id, ids, req.sampling, prompt, ctx)

    def _render(self, messages, ctx) -> str:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self.tok.apply_chat_template(msgs)
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 - template errors are the input's fault
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"messages: chat template failed: {e}")

    def Chat(self, req: pb.ChatRequest, ctx):
        text = self._render(req.messages, ctx)
        ids = self.tok.tok.encode(text, add_special_tokens=False).ids
        yield from self._stream(req.request_id, ids, req.sampling, text, ctx)

    # ------------------------------------------------------------ the rest
    def Tokenize(self, req: pb.TokenizeRequest, ctx):
        if req.messages:
            ids = self.tok.tok.encode(self._render(req.messages, ctx), add_special_tokens=False).ids
        else:
            ids = self.tok.encode(req.text)
        return pb.TokenizeResponse(token_ids=ids, tokens=[self.tok.id_to_token(i) or "" for i in ids])

    def GetModelInfo(self, req, ctx):
        c = self.cfg
        return pb.ModelInfo(name=self.model_name, dtype=self.dtype, num_layers=c.num_layers,
                            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                            vocab_size=c.vocab_size, max_model_len=self.core.engine.cfg.max_model_len,
                            eos_token_ids=list(self.tok.eos_token_ids),
                            has_chat_template=bool(self.tok.chat_template))

    def GetClusterStatus(self, req, ctx):
        """Workers with the router's own truth about placement and KV (it owns both),
        plus liveness, device and address from Redis."""
        eng = self.core.engine
        d = self.dispatcher
        for _ in range(5):  # the engine thread may be mid-update: take a consistent copy
            try:
                seq_to_rid = {s.seq_id: s.request_id for s in list(eng.seqs.values())}
                resident = [m.resident() for m in eng.managers]
                used = [m.used_tokens for m in eng.managers]
                tokens, groups, _ = d.state()
                break
            except RuntimeError:
                time.sleep(0.001)
        else:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "cluster state busy; retry")
        loads = d.predicted_times(tokens, groups)
        workers = {w["id"]: w for w in read_workers(self.redis)}
        ss = eng.executor.stats
        st = pb.ClusterStatus(policy=d.policy, waiting=len(eng.scheduler.waiting),
                              running=len(eng.scheduler.running), model=self.model_name,
                              steps=pb.StepBreakdown(
                                  steps=ss.steps, step_call_s=ss.rpc_s, dense_worker_s=ss.dense_total_s,
                                  dense_compute_s=ss.dense_s, local_attn_s=ss.local_attn_s,
                                  exchange_wait_s=ss.exchange_wait_s))
        for i, wid in enumerate(self.device_ids):
            w = workers.get(wid, {})
            dev = d.devices[i]
            ws = st.workers.add(id=wid, kind=w.get("kind", "dense" if i == 0 else "attention"),
                                device=w.get("device", ""), address=w.get("address", ""),
                                alive=w.get("alive", False), kv_used_tokens=used[i],
                                kv_total_tokens=dev.capacity_blocks * d.block_size,
                                load=loads[i], cost_per_token=dev.cost_per_token)
            for sid, gs in sorted(resident[i].items()):
                ws.resident.add(request_id=seq_to_rid.get(sid, str(sid)), groups=gs)
        return st


def _wait(what: str, fn, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = fn()
            if r:
                return r
        except grpc.RpcError as e:
            last = e.details()
        time.sleep(interval)
    raise SystemExit(f"router: timed out after {timeout:.0f}s waiting for {what}"
                     + (f" ({last})" if last else ""))


def _refresh_costs(dispatcher: Dispatcher, device_ids: list[str], redis_url: str, stop) -> None:
    """Online refinement: take the workers' measured costs from Redis every second."""
    r = connect(redis_url)
    while not stop.wait(1.0):
        try:
            by_id = {w["id"]: w for w in read_workers(r)}
        except Exception as e:  # noqa: BLE001 - Redis hiccup: keep the last model
            log.warning("telemetry read failed: %s", e)
            continue
        for dev, wid in zip(dispatcher.devices, device_ids):
            w = by_id.get(wid)
            if w and w["cost_per_token"] > 0:
                dev.cost_per_token, dev.cost_per_group = w["cost_per_token"], w["cost_per_group"]


def run(args) -> None:
    setup_logging(args.log_level)
    cfg, tok = load_meta(args.model)
    ch = grpc.insecure_channel(args.dense_worker, options=GRPC_OPTIONS)
    dense = worker_pb2_grpc.DenseWorkerStub(ch)
    info = _wait(f"the dense worker at {args.dense_worker}",
                 lambda: dense.Info(worker_pb2.InfoRequest(), timeout=5), args.startup_timeout)
    if (info.num_layers, info.num_kv_heads) != (cfg.num_layers, cfg.num_kv_heads):
        raise SystemExit("router: --model differs from the dense worker's model")
    r = connect(args.redis_url)
    addrs = []
    if args.attn_workers:
        def enough():
            live = [w for w in read_workers(r) if w["kind"] == "attention" and w["alive"]]
            return sorted(live, key=lambda w: w["id"])[:args.attn_workers] \
                if len(live) >= args.attn_workers else None
        addrs = [w["address"] for w in _wait(f"{args.attn_workers} attention workers in Redis",
                                              enough, args.startup_timeout)]
    info = dense.Connect(worker_pb2.ConnectRequest(attn_addresses=addrs), timeout=args.startup_timeout)
    bs = info.block_size
    ecfg = EngineConfig(block_size=bs, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=min(args.max_model_len, cfg.max_position))
    managers = [BlockManager(max(1, info.kv_tokens // bs), bs)] + \
        [BlockManager(max(1, p.kv_tokens // bs), bs) for p in info.peers]
    dtype_bytes = 2 if info.dtype == "bfloat16" else 4
    row_bytes = (2 * info.q_per_group + 2) * info.head_dim * dtype_bytes  # out + back, per group row
    devices = [Device(info.id, managers[0].num_blocks)] + [
        Device(p.id, m.num_blocks, remote=True, latency=p.latency_s, bandwidth=p.bandwidth_bps)
        for p, m in zip(info.peers, managers[1:])]
    device_ids = [info.id] + [p.id for p in info.peers]
    dispatcher = Dispatcher(devices, cfg.num_groups, cfg.num_layers, bs, ecfg.max_model_len, row_bytes,
                            policy=args.policy)
    engine = Engine(RemoteExecutor(dense), tok, managers, ecfg, place=dispatcher.place,
                    eos_token_ids=cfg.eos_token_ids, vocab_size=cfg.vocab_size)
    dispatcher.get_running = lambda: engine.scheduler.running
    core = ServingLoop(engine, args.max_queue).start()
    stop = threading.Event()
    threading.Thread(target=_refresh_costs, args=(dispatcher, device_ids, args.redis_url, stop),
                     daemon=True, name="cost-refresh").start()
    impl = Generation(core, tok, cfg, info.model, info.dtype, dispatcher, args.redis_url, device_ids)
    log.info("router ready: %d attention workers, policy %s", len(info.peers), args.policy)

    def on_stop():
        stop.set()
        core.stop()

    serve("router", args.port, [lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(impl, s)],
          ["hetis.v1.Generation"], metrics_port=args.metrics_port, on_stop=on_stop, host=args.host)
