"""The DenseWorker servicer: Step, Info, Connect, each mapped onto hetis.mesh.dense_worker."""
from __future__ import annotations

import logging

import grpc
from prometheus_client import Counter, Histogram

from hetis.mesh import wire
from hetis.mesh.dense_worker import BackendsLost, ConnectFailed, DenseWorker, StepAbandoned
from hetis.mesh.flags import DenseWorkerConfig, apply_threads, check_device
from hetis.mesh.service import serve_worker, setup_logging
from hetis.model import compute
from hetis.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("hetis.dense_worker")
STEP_SECONDS = Histogram("hetis:step_duration_seconds", "dense worker step time",
                         buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
STEP_TOKENS = Counter("hetis:step_tokens_total", "tokens processed by steps")


class DenseWorkerServicer(worker_pb2_grpc.DenseWorkerServicer):
    def __init__(self, worker: DenseWorker):
        self.worker = worker

    def Info(self, req, ctx):
        return self.worker.info()

    def Connect(self, req: worker_pb2.ConnectRequest, ctx):
        addrs = tuple(req.attn_addresses)
        if any(not a or ":" not in a for a in addrs):
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "attn_addresses: each must be host:port")
        if set(req.renew) - set(addrs):
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "renew: each must also be in attn_addresses")
        try:
            return self.worker.connect(addrs, tuple(req.renew))
        except ConnectFailed as e:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"attention worker join failed: {e}")

    def Step(self, req: worker_pb2.StepRequest, ctx):
        try:
            step = wire.step_from_proto(req, self.worker.num_backends)
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            # a step whose caller gave up while it waited for the worker (the router timed
            # out and recovers its sequences elsewhere) must not run late
            toks, t = compute.run(self.worker.execute, step, still_wanted=ctx.is_active)
        except BackendsLost as e:  # the router recovers: it reads which backends from metadata
            ctx.set_trailing_metadata(((wire.LOST_BACKENDS_KEY, wire.backends_to_metadata(e.backends)),))
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"step {req.step_id}: {e}")
        except StepAbandoned as e:
            ctx.abort(grpc.StatusCode.CANCELLED, f"step {req.step_id}: {e}")
        except (IndexError, ValueError) as e:  # a layout that does not fit this worker's cache
            log.exception("step %d rejected", req.step_id)
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {req.step_id}: {e}")
        except Exception as e:  # noqa: BLE001 - e.g. an attention worker went away
            log.exception("step %d failed", req.step_id)
            ctx.abort(grpc.StatusCode.INTERNAL, f"step {req.step_id} failed: {type(e).__name__}: {e}")
        STEP_SECONDS.observe(t.total)
        STEP_TOKENS.inc(step.num_tokens)
        return wire.step_result_to_proto(req.step_id, toks, t)


def run(cfg: DenseWorkerConfig) -> None:
    setup_logging(cfg.log_level)
    apply_threads(cfg.threads)
    check_device(cfg.device)
    try:
        # built and stepped on one thread: one OpenMP team in the process (hetis/model/compute.py)
        worker = compute.run(DenseWorker, cfg)
    except ValueError as e:  # e.g. "tp: must be between 1 and ..."
        raise SystemExit(f"dense worker: --{e}") from None
    impl = DenseWorkerServicer(worker)
    serve_worker("dense_worker", cfg, worker,
                 lambda s: worker_pb2_grpc.add_DenseWorkerServicer_to_server(impl, s),
                 "hetis.v1.DenseWorker")
