"""What ``hetis bench`` sends requests to: the in-process engine or a running cluster.

Each target's ``stream(request_id, prompt_token_ids, output_len)`` yields the number
of new tokens in each streamed piece, as the client sees them arrive; the runner
stamps the times.
"""
from __future__ import annotations

import queue
from typing import Iterator

from hetis.engine.sampling import ParamError

LOCAL_MAX_QUEUE = 1 << 30   # the benchmark holds its own arrivals; never refuse one


class LocalTarget:
    """``hetis.LLM``'s engine driven by ``ServingLoop`` in a thread: requests arrive over
    time and stream their tokens, as behind the router (without gRPC)."""

    kind = "engine"

    def __init__(self, model: str | None, dtype: str, placement: list[int] | None,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 temperature: float = 0.0, ignore_eos: bool = False):
        from hetis import LLM
        from hetis.engine.serving import ServingLoop
        self.llm = LLM(model=model, dtype=dtype, placement=placement, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len)
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.engine_config.max_model_len
        self.temperature, self.ignore_eos = temperature, ignore_eos
        self.core = ServingLoop(self.llm.engine, LOCAL_MAX_QUEUE).start()
        self.description = {"target": "engine", "dtype": dtype,
                            "placement": list(self.llm.placement or [])}

    def stream(self, request_id: str, prompt_token_ids: list[int], output_len: int) -> Iterator[int]:
        from hetis.engine.sampling import SamplingParams
        params = SamplingParams(temperature=self.temperature, max_tokens=output_len,
                                ignore_eos=self.ignore_eos)
        q = self.core.submit(request_id, prompt_token_ids, params, None)
        while True:
            try:
                o = q.get(timeout=1.0)
            except queue.Empty:
                if not self.core.thread.is_alive():
                    raise RuntimeError("the engine thread has stopped") from None
                continue
            if isinstance(o, Exception):
                raise o
            if o.new_token_ids:
                yield len(o.new_token_ids)
            if o.finished:
                if not o.seq.output_token_ids:
                    raise RuntimeError(f"finished without output ({o.seq.finish_reason})")
                return

    def close(self) -> None:
        self.core.stop()


class ClusterTarget:
    """A running cluster's router, through ``hetis.Client`` (one thread per request)."""

    kind = "cluster"

    def __init__(self, target: str, model: str | None, timeout: float | None,
                 temperature: float = 0.0, ignore_eos: bool = False):
        from hetis.client import Client
        from hetis.model.loader import load_meta
        self.client = Client(target, timeout=timeout)
        info = self.client.model_info()
        _, self.tokenizer = load_meta(model)   # for the ordinary token ids of the prompts
        if self.tokenizer.vocab_size != info["vocab_size"]:
            self.client.close()
            raise ParamError("model", f"the local tokenizer has {self.tokenizer.vocab_size} tokens, "
                             f"the cluster's model {info['vocab_size']}; pass the cluster's --model")
        self.max_model_len = info["max_model_len"]
        self.temperature, self.ignore_eos, self.timeout = temperature, ignore_eos, timeout
        self.description = {"target": target, "dtype": info["dtype"], "model_name": info["name"]}
        try:
            st = self.client.cluster_status()
            self.description["policy"] = st.get("policy")
            self.description["workers"] = [{"id": w["id"], "kind": w["kind"], "device": w["device"]}
                                           for w in st.get("workers", [])]
        except Exception:  # noqa: BLE001 - the description is a courtesy
            pass

    def stream(self, request_id: str, prompt_token_ids: list[int], output_len: int) -> Iterator[int]:
        for chunk in self.client.stream(prompt_token_ids=prompt_token_ids, request_id=request_id,
                                        max_tokens=output_len, temperature=self.temperature,
                                        ignore_eos=self.ignore_eos):
            if chunk.token_ids:
                yield len(chunk.token_ids)

    def close(self) -> None:
        self.client.close()
