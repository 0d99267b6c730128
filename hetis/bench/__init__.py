"""``hetis bench``: a serving benchmark in the manner of vLLM's benchmark_serving.

- workloads: request lengths (random, sharegpt-synth), prompts, arrival times
- metrics:   TTFT, TPOT, ITL, E2EL, throughputs, goodput
- targets:   the in-process engine (hetis.engine.serving.ServingLoop over hetis.LLM) or a running cluster
- runner:    sends the requests over time and times the streams
- hf_baseline: transformers generate on the same requests
- report:    the summary table, JSON and plot
"""
