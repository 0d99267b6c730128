"""The data plane: what the dense and attention workers run.

Loading weights and tokenizers, the dense half of the model, the attention
backend over a paged KV store, the executor that runs one step, the sampler.
"""
