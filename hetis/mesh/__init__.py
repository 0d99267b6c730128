"""The mesh: what turns the engine and the model into processes that talk.

Proto <-> library conversion (wire), the tensor path between dense and
attention workers, discovery and telemetry in Redis, gRPC service plumbing and
shared flags, and each service's runtime (router, dense worker, attention worker).
"""
