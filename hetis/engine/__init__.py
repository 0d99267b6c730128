"""The control plane: what the router runs (and ``hetis.LLM``, and the simulator).

Sequences, sampling parameters, block accounting, the step value, the
scheduler, the head dispatcher, the engine and its serving loop. No model
weights, no grpc, no redis: the executor is handed in (duck-typed ``execute``).
"""
