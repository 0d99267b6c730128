"""The public hetis.v1.Generation servicer: each call mapped onto hetis.mesh.router.Router."""
from __future__ import annotations

import queue
import uuid

import grpc

from hetis.engine.serving import QueueFull
from hetis.mesh import wire
from hetis.mesh.flags import RouterConfig
from hetis.mesh.router import Router
from hetis.mesh.service import serve, setup_logging
from hetis.v1 import generation_pb2 as pb
from hetis.v1 import generation_pb2_grpc


class Generation(generation_pb2_grpc.GenerationServicer):
    def __init__(self, router: Router):
        self.router = router

    def _stream(self, request_id: str, ids: list[int], sp: pb.SamplingParams, prompt, ctx):
        try:
            params = wire.sampling_from_proto(sp)
            rid = request_id or uuid.uuid4().hex
            out = self.router.submit(rid, ids, params, prompt)
        except QueueFull as e:
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        # a cancelled call or a gone client aborts the request and frees its KV
        finished = False
        ctx.add_callback(lambda: None if finished else self.router.abort(rid))
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
                yield wire.chunk_to_proto(o, rid)
        finally:
            if not finished:
                self.router.abort(rid)

    def Generate(self, req: pb.GenerateRequest, ctx):
        try:
            prompt, ids = wire.prompt_from_request(req)
            ids = ids if ids is not None else self.router.tokenizer.encode(prompt)
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        yield from self._stream(req.request_id, ids, req.sampling, prompt, ctx)

    def Chat(self, req: pb.ChatRequest, ctx):
        try:
            ids, text = self.router.encode_chat(wire.messages_from_proto(req.messages))
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        yield from self._stream(req.request_id, ids, req.sampling, text, ctx)

    def Tokenize(self, req: pb.TokenizeRequest, ctx):
        tok = self.router.tokenizer
        try:
            ids = (self.router.encode_chat(wire.messages_from_proto(req.messages))[0]
                   if req.messages else tok.encode(req.text))
        except ValueError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids, tokens=[tok.id_to_token(i) or "" for i in ids])

    def GetModelInfo(self, req, ctx):
        return self.router.model_info()

    def GetClusterStatus(self, req, ctx):
        try:
            return self.router.cluster_status()
        except (RuntimeError, TimeoutError) as e:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"cluster status: {e}")


def run(cfg: RouterConfig) -> None:
    setup_logging(cfg.log_level)
    router = Router(cfg).start()
    impl = Generation(router)
    serve("router", cfg.port, [lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(impl, s)],
          ["hetis.v1.Generation"], metrics_port=cfg.metrics_port, on_stop=router.close,
          host=cfg.host)
