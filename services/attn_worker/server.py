"""The AttentionWorker gRPC service and its tensor loop."""
from __future__ import annotations

import datetime
import logging
import threading

import grpc
import torch
import torch.distributed as dist
from prometheus_client import Gauge

from hetis.attention import AttentionBackend, profile_attention
from hetis.llm import DTYPES
from hetis.remote import AttentionLoop
from hetis.service import serve, setup_logging
from hetis.telemetry import Registration
from hetis.v1 import worker_pb2, worker_pb2_grpc
from hetis.worker_common import advertise, apply_threads, describe_device

log = logging.getLogger("hetis.attn_worker")
KV_USED = Gauge("hetis:kv_used_tokens", "KV cache in use, tokens x head groups", ["worker"])
KV_TOTAL = Gauge("hetis:kv_total_tokens", "KV cache capacity, tokens x head groups", ["worker"])
ATTN_STEPS = Gauge("hetis:attn_steps", "decode/prefill steps served", ["worker"])


class AttentionWorker(worker_pb2_grpc.AttentionWorkerServicer):
    def __init__(self, wid: str, device: str, kv_tokens: int):
        self.wid, self.device, self.kv_tokens = wid, device, kv_tokens
        self.loop: AttentionLoop | None = None
        self.thread: threading.Thread | None = None
        self.group_id = ""
        self.lock = threading.Lock()
        KV_TOTAL.labels(wid).set(kv_tokens)

    def Join(self, req: worker_pb2.JoinRequest, ctx) -> worker_pb2.JoinResponse:
        if req.dtype not in DTYPES:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dtype: must be one of {sorted(DTYPES)}")
        if req.backend not in ("gloo", "nccl"):
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "backend: must be 'gloo' or 'nccl'")
        for f in ("num_layers", "q_per_group", "head_dim", "block_size", "world_size", "rank"):
            if getattr(req, f) == 0:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{f}: must be positive")
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                if req.group_id == self.group_id:
                    return self._response()
                ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"already in tensor group {self.group_id!r}; restart this worker to join another")
            num_blocks = max(1, self.kv_tokens // req.block_size)
            backend = AttentionBackend(req.num_layers, num_blocks, req.block_size, req.head_dim,
                                       req.q_per_group, DTYPES[req.dtype], self.device)
            cost = profile_attention(backend)
            comm = "cuda" if req.backend == "nccl" else "cpu"
            dist.init_process_group(req.backend, init_method=f"tcp://{req.master_addr}:{req.master_port}",
                                    rank=req.rank, world_size=req.world_size,
                                    timeout=datetime.timedelta(seconds=120))
            self.loop = AttentionLoop(backend, req.num_layers, cost, comm_device=comm)
            self.group_id = req.group_id
            self.thread = threading.Thread(target=self._run, name="attention-loop", daemon=True)
            self.thread.start()
            log.info("joined tensor group %s as rank %d/%d (%s); cost %.3g s/token, %.3g s/group",
                     req.group_id, req.rank, req.world_size, req.backend, *cost)
            return self._response()

    def _run(self) -> None:
        try:
            self.loop.run()
            log.info("tensor group %s stopped", self.group_id)
        except Exception:  # the dense worker went away: the group is gone
            log.exception("tensor loop ended")

    def _response(self) -> worker_pb2.JoinResponse:
        return worker_pb2.JoinResponse(id=self.wid, kv_tokens=self.kv_tokens,
                                       device=describe_device(self.device))

    def telemetry(self) -> dict:
        if self.loop is None:
            return {"kv_used_tokens": 0, "resident": {}, "steps": 0}
        t = self.loop.telemetry()
        KV_USED.labels(self.wid).set(t["kv_used_tokens"])
        ATTN_STEPS.labels(self.wid).set(t["steps"])
        return t

    def Stats(self, req, ctx) -> worker_pb2.AttnStats:
        t = self.telemetry()
        res = self.loop.residency.groups() if self.loop else {}
        return worker_pb2.AttnStats(
            id=self.wid, device=describe_device(self.device), kv_total_tokens=self.kv_tokens,
            kv_used_tokens=t["kv_used_tokens"], resident_seq_ids=list(res),
            resident_groups=[sum(1 << g for g in gs) for gs in res.values()],
            cost_per_token=t.get("cost_per_token", 0.0), cost_per_group=t.get("cost_per_group", 0.0),
            steps=t["steps"], joined=self.loop is not None)


def run(args) -> None:
    setup_logging(args.log_level)
    apply_threads(args.threads)
    if args.kv_tokens <= 0:
        raise SystemExit("--kv-tokens: must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    holder = {}

    def started(svc):
        host = advertise(args.advertise_host)
        wid = args.worker_id or f"attn-{host}:{svc.port}"
        impl.wid = wid
        holder["reg"] = Registration(args.redis_url, wid, "attention", f"{host}:{svc.port}",
                                     describe_device(args.device), args.kv_tokens,
                                     telemetry=impl.telemetry).start()

    impl = AttentionWorker(args.worker_id or "", args.device, args.kv_tokens)

    def stop():
        if "reg" in holder:
            holder["reg"].stop()

    serve("attn_worker", args.port,
          [lambda s: worker_pb2_grpc.add_AttentionWorkerServicer_to_server(impl, s)],
          ["hetis.v1.AttentionWorker"], metrics_port=args.metrics_port, on_stop=stop,
          host=args.host, on_started=started)
