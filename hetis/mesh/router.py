"""The router's runtime: one engine over every dense worker, stepped by the serving loop.

Dense workers are serving instances (hetis/engine/instance.py): each runs its
own batch; all share the attention workers. The router finds them through
``--dense-worker`` addresses and Redis (kind ``dense``) and serves once
``--dense-workers N`` answer and ``--attn-workers N`` attention workers are
live. Each dense worker is asked to ``Connect`` the attention workers (one
tensor channel per pair) and becomes an instance whose executor is a
:class:`~hetis.mesh.fleet.RemoteExecutor` (one ``Step`` gRPC call per step);
hetis/mesh/fleet.py maps its backends onto the engine's devices.

A background thread (:meth:`Router._watch`) reads Redis every second: it
copies measured attention costs into the dispatcher's device models (online
refinement), drops draining attention workers from dispatch, asks every dense
worker ``Info`` (not answering: its instance is lost and its sequences are
recomputed on the others; answering with a new incarnation: it restarted and
joins again as a fresh instance, adopting what waited for it), attaches dense
workers that appear, and has each dense worker ``Connect`` the live attention
workers it does not reach. The router is ready while any instance is.

The public gRPC servicer (services/router/server.py, on asyncio) only maps
calls to the methods here. Threads: the event loop (every stream, health,
status), the serving loop (the only one touching engine state; status is a
snapshot taken between steps), one step thread per dense worker, and a small
pool for tokenizing and chat templating, so a long prompt never stalls the
event loop. A prompt longer than ``max_prompt_chars`` is refused before it
is tokenized.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import redis

from hetis.engine.config import EngineConfig
from hetis.engine.detokenize import TextStream
from hetis.engine.engine import build_engine
from hetis.engine.sampling import ParamError, SamplingParams
from hetis.engine.serving import ServingLoop
from hetis.mesh import wire
from hetis.mesh.discovery import connect, read_workers
from hetis.mesh.fleet import DenseHandle, Fleet
from hetis.mesh.flags import RouterConfig
from hetis.model.loader import load_meta
from hetis.model.tokenizer import validate_messages
from hetis.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("hetis.router")


class ModelMismatch(RuntimeError):
    """A dense worker serves another model than the router's."""


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
        except redis.RedisError as e:  # Redis not up yet: keep waiting
            last = f"Redis: {e}"
        time.sleep(interval)
    raise SystemExit(f"router: timed out after {timeout:.0f}s waiting for {what}"
                     + (f" ({last})" if last else ""))


class Router:
    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.model_cfg, self.tokenizer = load_meta(cfg.model)
        self.redis = connect(cfg.redis_url)
        self._stop = threading.Event()
        self.fleet = Fleet()
        self.engine = None
        self._aliases: set[str] = set()  # more addresses of dense workers we have
        self.max_prompt_chars = cfg.max_prompt_chars or 32 * cfg.max_model_len
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    @property
    def dense_ok(self) -> bool:
        """Some dense worker serves (the engine exists and an instance is live)."""
        return self.engine is not None and any(not i.lost for i in self.engine.instances)

    # ------------------------------------------------------------ start-up
    def start(self) -> "Router":
        cfg = self.cfg
        try:
            dense = _wait(f"{cfg.dense_workers} dense worker(s)", self._answering_dense,
                          cfg.startup_timeout)[:max(cfg.dense_workers, 1)]
        except ModelMismatch as e:
            raise SystemExit(f"router: {e}") from None
        self._first_info = first = dense[0][1]
        for h, info in dense[1:]:
            if (info.block_size, info.dtype, info.model) != (first.block_size, first.dtype, first.model):
                raise SystemExit(f"router: dense worker {h.wid} runs {info.model} {info.dtype} with "
                                 f"block size {info.block_size}; {dense[0][0].wid} runs "
                                 f"{first.model} {first.dtype} with {first.block_size}: they must agree")
        addrs = [w["address"] for w in self._wait_attention_workers()]
        for h, info in dense:
            info = h.stub.Connect(worker_pb2.ConnectRequest(attn_addresses=addrs),
                                  timeout=cfg.startup_timeout)
            self.engine = self.fleet.attach(self.engine, h, info, self._build)
        self.loop = ServingLoop(self.engine, cfg.max_queue).start()
        threading.Thread(target=self._watch, daemon=True, name="membership").start()
        log.info("router ready: %d dense and %d attention workers, policy %s", len(dense),
                 len(addrs), cfg.policy)
        return self

    def _build(self, executor, devices):
        cfg, mc, info = self.cfg, self.model_cfg, self._first_info
        self.model_name, self.dtype = info.model, info.dtype
        ecfg = EngineConfig(block_size=info.block_size, max_num_seqs=cfg.max_num_seqs,
                            max_num_batched_tokens=cfg.max_num_batched_tokens,
                            max_model_len=min(cfg.max_model_len, mc.max_position),
                            kv_headroom=cfg.kv_headroom, kv_balance=cfg.kv_balance,
                            rebalance_threshold=cfg.rebalance_threshold,
                            max_move_tokens=cfg.max_move_tokens, migrate_every=cfg.migrate_every)
        if cfg.step_log:   # the steps' times and shapes, for the simulator's calibration
            from hetis.sim.measured import record_steps, shape_of
            out = open(cfg.step_log, "a", buffering=1)  # noqa: SIM115 - lives as the router
            record_steps(executor, shape_of(mc), lambda r: out.write(json.dumps(r) + "\n"))
        return build_engine(executor, self.tokenizer, mc, ecfg, devices, policy=cfg.policy,
                            kv_bytes=2 if info.dtype == "bfloat16" else 4,
                            detokenize=False)  # done per stream in stream()

    def _open(self, address: str) -> tuple[DenseHandle, object] | None:
        """A handle on the dense worker at ``address`` and its Info, or None (not answering);
        SystemExit when it serves another model than ours."""
        channel = self.cfg.security.internal_channel(address)
        try:
            info = worker_pb2_grpc.DenseWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)
        except grpc.RpcError:
            channel.close()
            return None
        mc = self.model_cfg
        if (info.num_layers, info.num_kv_heads) != (mc.num_layers, mc.num_kv_heads):
            channel.close()
            raise ModelMismatch(f"--model differs from the model of dense worker {info.id} "
                                f"at {address}")
        if self.engine is not None and (info.block_size, info.dtype, info.model) != \
                (self.engine.cfg.block_size, self.dtype, self.model_name):
            channel.close()
            log.error("dense worker %s at %s is not like the others (%s, block size %d, %s): "
                      "left out", info.id, address, info.model, info.block_size, info.dtype)
            return None
        return self.fleet.handle(info.id, address, channel, info.incarnation), info

    def _dense_addresses(self, r) -> list[str]:
        """--dense-worker addresses, then the live dense workers registered in Redis."""
        named = [a for a in self.cfg.dense_worker.split(",") if a]
        try:
            seen = [w["address"] for w in sorted(read_workers(r), key=lambda w: w["id"])
                    if w["kind"] == "dense" and w["alive"]]
        except redis.RedisError:
            if not named:
                raise
            seen = []
        return list(dict.fromkeys(named + seen))

    def _answering_dense(self):
        opened = [o for o in (self._open(a) for a in self._dense_addresses(self.redis)) if o]
        ids = {h.wid for h, _ in opened}
        if len(ids) >= max(self.cfg.dense_workers, 1):
            return list({h.wid: (h, info) for h, info in opened}.values())
        for h, _ in opened:
            h.channel.close()
        return None

    def _wait_attention_workers(self) -> list[dict]:
        n = self.cfg.attn_workers
        if not n:
            return []

        def enough():
            live = [w for w in read_workers(self.redis) if w["kind"] == "attention" and w["alive"]]
            return sorted(live, key=lambda w: w["id"])[:n] if len(live) >= n else None
        return _wait(f"{n} attention workers in Redis", enough, self.cfg.startup_timeout)

    # ------------------------------------------------------------ membership
    def _watch(self) -> None:
        """Every second: refresh the cost models from Redis, check every dense worker,
        attach new ones, connect attention workers to the dense workers that lack them."""
        r = connect(self.cfg.redis_url)
        while not self._stop.wait(1.0):
            try:
                by_id = {w["id"]: w for w in read_workers(r)}
            except Exception as e:  # noqa: BLE001 - Redis hiccup: keep the last model
                log.warning("telemetry read failed: %s", e)
                continue
            try:
                self._membership(r, by_id)
            except ModelMismatch as e:
                log.error("membership: %s: left out", e)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("membership round failed")

    def _membership(self, r, by_id: dict) -> None:
        fleet, call = self.fleet, self.loop.call
        attn = {wid: w for wid, w in by_id.items() if w["kind"] == "attention"}
        fleet.gone = {wid for wid, w in attn.items() if not w["alive"] or w["draining"]}
        devices = self.engine.dispatcher.devices
        for dev, wid in zip(list(devices), list(fleet.device_ids)):
            w = by_id.get(wid)
            if w and w["cost_per_token"] > 0 and fleet.kinds.get(wid) == "attention":
                dev.cost_per_token, dev.cost_per_group = w["cost_per_token"], w["cost_per_group"]
        call(lambda eng: fleet.note_draining(eng, by_id))
        call(fleet.note_losses)
        for h in list(fleet.dense.values()):
            self._check_dense(h)
        known = {h.address for h in fleet.dense.values()} | self._aliases
        for addr in self._dense_addresses(r):
            if addr not in known:
                self._attach_new(addr, attn)
        now = time.monotonic()
        live = [w for w in attn.values() if w["alive"] and not w["draining"]]
        for h in list(fleet.dense.values()):
            if h.lost:
                continue
            todo = [w for w in live if not fleet.reaches(h, w["id"]) and h.retry_at.get(w["id"], 0) <= now]
            if todo:
                self._connect(h, todo)

    def _check_dense(self, h: DenseHandle) -> None:
        """Is dense worker ``h`` there, and the same process we attached? Lost when it does
        not answer; a restarted one (new incarnation) starts over as a fresh instance."""
        try:
            info = h.stub.Info(worker_pb2.InfoRequest(), timeout=2)
        except grpc.RpcError:
            if not h.lost:
                n = self.loop.call(lambda eng: self.fleet.lose(eng, h))
                log.error("dense worker %s at %s is not answering: %d sequences move to the other "
                          "instances", h.wid, h.address, n)
            return
        inst = self.engine.instances[h.index]
        if inst.name == h.wid and inst.lost and not h.lost:
            h.lost = True  # lost through a failed step (the serving loop dropped it)
        if info.incarnation == h.incarnation and not h.lost:
            return
        if not h.lost:
            n = self.loop.call(lambda eng: self.fleet.lose(eng, h))
            log.warning("dense worker %s restarted: its %d sequences are recomputed", h.wid, n)
        # it answers again (restarted, or back after a failed step): a fresh instance in its
        # slot, which adopts what waited for it
        self.fleet.dense.pop(h.wid, None)
        h.channel.close()
        self._attach_new(h.address, {})

    def _attach_new(self, address: str, attn: dict) -> None:
        opened = self._open(address)
        if opened is None:
            return
        h, info = opened
        old = self.fleet.dense.get(h.wid)
        if old is not None and not old.lost:  # already ours under another address
            h.channel.close()
            self._aliases.add(address)
            return
        self.loop.call(lambda eng: self.fleet.attach(eng, h, info, self._build))
        log.info("dense worker %s at %s joined as instance %d", h.wid, address, h.index)

    def _connect(self, h: DenseHandle, workers: list[dict]) -> None:
        """Have dense worker ``h`` join ``workers`` (renewing channels it must not trust)."""
        addrs = [w["address"] for w in workers]
        renew = [w["address"] for w in workers if w["id"] in h.renew]
        try:
            info = h.stub.Connect(worker_pb2.ConnectRequest(attn_addresses=addrs, renew=renew),
                                  timeout=240)
        except grpc.RpcError as e:
            log.warning("dense worker %s could not join %s: %s", h.wid, addrs, e.details())
            for w in workers:
                h.retry_at[w["id"]] = time.monotonic() + 10.0
            return
        joined = {p.id for p in info.peers if not p.lost}
        for w in workers:
            if w["id"] not in joined:
                h.retry_at[w["id"]] = time.monotonic() + 10.0
        self.loop.call(lambda eng: self.fleet.sync(eng, h, info, renewed=joined))

    def ready(self) -> bool:
        """Whether requests can be served (the health service follows it)."""
        # dense_ok needs the engine and a live instance; a loop that died of a bug is no
        # longer alive (its error says why)
        return self.dense_ok and not self._stop.is_set() and self.loop.thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if hasattr(self, "loop"):
            self.loop.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ requests
    def _check_size(self, field: str, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise ParamError(field, f"{chars} characters exceed the limit of {self.max_prompt_chars} "
                             "(--max-prompt-chars)")

    async def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, off the event loop; ParamError when it is too long."""
        self._check_size("prompt", len(prompt))
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.tokenizer.encode, prompt)

    async def encode_chat(self, messages: list[dict]) -> tuple[list[int], str]:
        """(token ids, rendered prompt) of a chat, off the event loop; ParamError if a message
        is malformed or the whole too long."""
        validate_messages(messages)
        self._check_size("messages", sum(len(m["content"]) + len(m["role"]) for m in messages))
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._encode_chat, messages)

    def render_chat(self, messages: list[dict]) -> str:
        """The chat prompt; a template that fails is the input's fault (ParamError)."""
        try:
            return self.tokenizer.apply_chat_template(messages)
        except ParamError:
            raise
        except ValueError as e:
            raise ParamError("messages", str(e).removeprefix("messages: ")) from None
        except Exception as e:  # noqa: BLE001 - jinja errors raised by the template itself
            raise ParamError("messages", f"chat template failed: {e}") from None

    def _encode_chat(self, messages: list[dict]) -> tuple[list[int], str]:
        text = self.render_chat(messages)
        return self.tokenizer.tok.encode(text, add_special_tokens=False).ids, text

    async def stream(self, request_id: str, ids: list[int], params: SamplingParams,
                     prompt: str | None):
        """An async generator of the request's StepOutputs, the last one ``finished``.

        Text is made here, on the event loop (the engine runs ``detokenize=False``): each
        output's token goes through the request's ``TextStream``; when a stop string
        completes, the request is aborted in the engine and this output is its last,
        with finish_reason "stop" (tokens the engine sampled after it are dropped).

        Raises QueueFull (at once, beyond ``max_queue`` waiting requests), ValueError (the
        engine refused the input), RuntimeError (the step failed). Leaving the generator
        early (a cancelled call, a gone client) aborts the request and frees its KV.
        """
        if not self.dense_ok:
            raise RuntimeError("no dense worker is answering; retry when the router reports SERVING")
        if len(ids) >= self.engine.cfg.max_model_len:  # before queueing a huge list
            raise ParamError("prompt", f"{len(ids)} tokens leave no room under max_model_len="
                             f"{self.engine.cfg.max_model_len}")
        aio = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        text = TextStream(self.tokenizer, ids, params)
        admitted = self.loop.add(request_id, ids, params, prompt,
                                 lambda o: aio.call_soon_threadsafe(outputs.put_nowait, o))
        finished = False
        try:
            await asyncio.wrap_future(admitted)
            while not finished:
                o = await outputs.get()
                if isinstance(o, Exception):
                    finished = True  # the loop already dropped it
                    raise o
                finished = o.finished
                # an EOS or stop token ("stop" from the engine) adds no text
                if o.new_token_ids and o.finish_reason in (None, "length") \
                        and text.feed(o.new_token_ids[-1]):
                    if not finished:  # a stop string: the engine goes no further
                        self.loop.abort(request_id, reason="stop")
                    o = replace(o, finished=True, finish_reason="stop")
                    finished = True
                o = replace(o, text_delta=text.delta(final=finished))
                yield o
        finally:
            if not finished:
                self.loop.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    # ------------------------------------------------------------ information
    def model_info(self):
        return wire.model_info_to_proto(self.model_cfg, self.model_name, self.dtype,
                                        self.engine.cfg.max_model_len, self.tokenizer)

    def cluster_status(self):
        """The engine's own view (snapshot from the loop thread) plus Redis liveness."""
        f = self.fleet
        snap, ids, kinds, steps = self.loop.call(lambda eng: (
            eng.snapshot(), list(f.device_ids), dict(f.kinds), f.stats()))
        try:
            workers = {w["id"]: w for w in read_workers(self.redis)}
        except redis.RedisError as e:
            raise RuntimeError(f"Redis is unreachable ({e}); retry") from None
        return wire.cluster_status_to_proto(snap, self.model_name, ids, kinds, workers, steps)
