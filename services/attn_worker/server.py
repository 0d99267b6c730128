"""The AttentionWorker servicer: Join and Stats, mapped onto hetis.mesh.attn_worker."""
from __future__ import annotations

import logging
import os

import grpc

from hetis.mesh import wire
from hetis.mesh.attn_worker import AttentionWorker, InAnotherGroup
from hetis.mesh.flags import WorkerConfig, apply_threads, check_device
from hetis.mesh.service import serve_worker, setup_logging
from hetis.v1 import worker_pb2, worker_pb2_grpc


class AttentionWorkerServicer(worker_pb2_grpc.AttentionWorkerServicer):
    def __init__(self, worker: AttentionWorker):
        self.worker = worker

    def Join(self, req: worker_pb2.JoinRequest, ctx) -> worker_pb2.JoinResponse:
        try:
            self.worker.join(*wire.join_from_proto(req))
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except InAnotherGroup as e:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return self.worker.join_response()

    def Stats(self, req, ctx) -> worker_pb2.AttnStats:
        return self.worker.stats()


def run(cfg: WorkerConfig) -> None:
    setup_logging(cfg.log_level)
    apply_threads(cfg.threads)
    check_device(cfg.device)
    worker = AttentionWorker(cfg)
    impl = AttentionWorkerServicer(worker)
    serve_worker("attn_worker", cfg, worker,
                 lambda s: worker_pb2_grpc.add_AttentionWorkerServicer_to_server(impl, s),
                 "hetis.v1.AttentionWorker")
    if worker.live_loops:
        # drained, but a dense worker still holds its channel open (it is closed from that
        # end): a thread blocked in a gloo recv would abort the interpreter's exit, so leave
        # without running destructors; the work is done and the logs are flushed
        logging.shutdown()
        os._exit(0)
