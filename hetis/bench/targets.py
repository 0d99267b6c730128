"""What ``hetis bench`` sends requests to: the in-process engine, a running cluster over
gRPC, or any OpenAI-compatible HTTP server.

Each target's ``stream(request_id, prompt_token_ids, output_len)`` yields the number
of new tokens in each streamed piece, as the client sees them arrive; the runner
stamps the times.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from hetis.engine.sampling import ParamError

LOCAL_MAX_QUEUE = 1 << 30   # the benchmark holds its own arrivals; never refuse one


class LocalTarget:
    """``hetis.LLM``'s engine driven by ``ServingLoop`` in a thread: requests arrive over
    time and stream their tokens, as behind the router (without gRPC)."""

    kind = "engine"

    def __init__(self, model: str | None, dtype: str, placement: list[int] | None,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 temperature: float = 0.0, ignore_eos: bool = False, weights: str = "dense",
                 kv_cache_dtype: str = "auto"):
        from hetis import LLM
        from hetis.engine.serving import ServingLoop
        self.llm = LLM(model=model, dtype=dtype, placement=placement, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                       weights=weights, kv_cache_dtype=kv_cache_dtype)
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.engine_config.max_model_len
        self.temperature, self.ignore_eos = temperature, ignore_eos
        self.core = ServingLoop(self.llm.engine, LOCAL_MAX_QUEUE).start()
        self.description = {"target": "engine", "dtype": dtype, "weights": weights,
                            "kv_cache_dtype": kv_cache_dtype,
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
                 temperature: float = 0.0, ignore_eos: bool = False, api_key: str | None = None):
        from hetis.client import Client
        from hetis.model.loader import load_meta
        self.client = Client(target, timeout=timeout, api_key=api_key)  # TLS: $HETIS_TLS_CA
        info = self.client.model_info()
        _, self.tokenizer = load_meta(model)   # for the ordinary token ids of the prompts
        if self.tokenizer.vocab_size != info["vocab_size"]:
            self.client.close()
            raise ParamError("model", f"the local tokenizer has {self.tokenizer.vocab_size} tokens, "
                             f"the cluster's model {info['vocab_size']}; pass the cluster's --model")
        self.max_model_len = info["max_model_len"]
        self.temperature, self.ignore_eos, self.timeout = temperature, ignore_eos, timeout
        self.description = {"target": target, "backend": "grpc", "dtype": info["dtype"],
                            "model_name": info["name"]}
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


class OpenAIRequestError(RuntimeError):
    """A request to an OpenAI-compatible server that failed: the server's error (its HTTP
    status and the OpenAI-shaped ``message``, ``type``, ``param`` and ``code``, from an
    error reply or an error event in the stream), or no complete reply: unreachable, cut
    off or past the deadline (``status`` None)."""

    def __init__(self, message: str, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: int | str | None = None):
        self.message, self.status, self.type, self.param, self.code = (message, status, type,
                                                                       param, code)
        about = [f"HTTP {status}"] if status is not None else []
        about += [str(type)] if type else []
        about += [f"param {param}"] if param else []
        super().__init__(f"{message} ({', '.join(about)})" if about else message)


class OpenAITarget:
    """An OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, ...) through its
    streaming ``/completions``, the prompt sent as token ids so its length is exact.

    The client is aiohttp (as in vLLM's own benchmark), on one event loop in a
    background thread: each runner thread hands its request to the loop and reads the
    token counts back from a queue, so the runner stamps the times as for the other
    targets. The connection pool is unbounded: a request waiting for a free connection
    would be timed as the server's latency.

    Servers differ in how many tokens one chunk carries, so a chunk counts as one token
    and the usage the server reports at the end (``stream_options.include_usage``)
    corrects the total: the difference comes as one more piece.
    """

    kind = "openai"

    def __init__(self, base_url: str, tokenizer, max_model_len: int, *, api_key: str | None = None,
                 served_model: str | None = None, timeout: float | None = None,
                 temperature: float = 0.0, ignore_eos: bool = False):
        """``tokenizer`` makes the prompts' token ids: it must be the served model's (the
        OpenAI API does not report a vocabulary to check it against). ``max_model_len``
        applies unless the server's /models entry gives its own (vLLM does)."""
        from hetis.client import DEFAULT_STREAM_TIMEOUT, DEFAULT_UNARY_TIMEOUT
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.temperature, self.ignore_eos = temperature, ignore_eos
        self.timeouts = (timeout or DEFAULT_UNARY_TIMEOUT, timeout or DEFAULT_STREAM_TIMEOUT)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-openai",
                                       daemon=True)
        self.thread.start()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = self._call(_open_session(headers))
        try:
            self.served_model, self.max_model_len = self._call(self._model(served_model,
                                                                           max_model_len))
        except BaseException:
            self.close()
            raise
        self.description = {"target": self.base_url, "backend": "openai",
                            "base_url": self.base_url, "model_name": self.served_model}

    async def _model(self, served_model: str | None, max_model_len: int) -> tuple[str, int]:
        """(the model to name in requests, its max_model_len), from GET /models."""
        models = (await self._get("/models")).get("data") or []
        if not served_model and not models:
            raise OpenAIRequestError(f"GET {self.base_url}/models lists no model; "
                                     "name one with --served-model")
        served_model = served_model or models[0]["id"]
        entry = next((m for m in models if m.get("id") == served_model), {})
        return served_model, entry.get("max_model_len") or max_model_len

    def _call(self, coro):
        """Run ``coro`` on the client's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _get(self, path: str) -> dict:
        import aiohttp
        url, timeout = self.base_url + path, aiohttp.ClientTimeout(total=self.timeouts[0])
        try:
            async with self.session.get(url, timeout=timeout) as r:
                reply = _json_or_text(await r.text())
                if r.status >= 400:
                    raise _reply_error(reply, r.status)
                if not isinstance(reply, dict):
                    raise OpenAIRequestError(f"GET {url}: not a JSON object: {reply[:200]!r}")
                return reply
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _no_reply(url, e, self.timeouts[0]) from e

    def stream(self, request_id: str, prompt_token_ids: list[int], output_len: int) -> Iterator[int]:
        body = {"model": self.served_model, "prompt": prompt_token_ids, "max_tokens": output_len,
                "temperature": self.temperature, "ignore_eos": self.ignore_eos, "stream": True,
                "stream_options": {"include_usage": True}}
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        done = asyncio.run_coroutine_threadsafe(self._stream(request_id, body, pieces.put),
                                                self.loop)
        try:
            while (n := pieces.get()) is not None:
                yield n
            done.result()   # the stream's error, if it had one
        finally:
            done.cancel()   # a consumer that stops early closes the connection

    async def _stream(self, request_id: str, body: dict, put) -> None:
        """POST the request and ``put`` each chunk's new tokens, then None."""
        import aiohttp
        url, timeout = f"{self.base_url}/completions", aiohttp.ClientTimeout(total=self.timeouts[1])
        try:
            # X-Request-Id: the server's logs (vLLM's, for one) then name the benchmark's ids
            async with self.session.post(url, json=body, headers={"X-Request-Id": request_id},
                                         timeout=timeout) as r:
                if r.status >= 400:
                    raise _reply_error(_json_or_text(await r.text()), r.status)
                counted = 0
                async for data in _sse_data(r.content):
                    if data == "[DONE]":
                        return
                    n = _new_tokens(_json_or_text(data), counted)
                    if n:
                        counted += n
                        put(n)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _no_reply(url, e, self.timeouts[1]) from e
        finally:
            put(None)

    def close(self) -> None:
        self._call(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _open_session(headers: dict):
    """The client session (made on the loop that will use it); no limit on connections."""
    import aiohttp
    return aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))


async def _sse_data(lines: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The data of each server-sent event: its ``data:`` lines, joined by newlines, up to
    the blank line that ends it (comments and other fields are skipped)."""
    data: list[str] = []
    async for raw in lines:
        line = raw.decode(errors="replace").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)


def _new_tokens(chunk, counted: int) -> int:
    """New tokens in one streamed chunk, ``counted`` having come before it.

    A chunk whose choice has text, or has no ``finish_reason`` (a token that decodes to
    no text yet), is one token; a bare end marker (no text, a finish reason, as
    llama.cpp's server sends) is none. A chunk with ``usage.completion_tokens`` gives
    the exact total so far, whatever the chunks carried (vLLM with multi-step or
    speculative decoding packs several tokens into one chunk)."""
    if not isinstance(chunk, dict):
        raise OpenAIRequestError(f"not a JSON object in the stream: {str(chunk)[:200]!r}")
    if chunk.get("error") or chunk.get("object") == "error":
        raise _reply_error(chunk, None)
    choices = chunk.get("choices") or ()
    n = int(any(c.get("text") or not c.get("finish_reason") for c in choices))
    total = (chunk.get("usage") or {}).get("completion_tokens")
    return n if total is None else total - counted


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _reply_error(reply, status: int | None) -> OpenAIRequestError:
    """The error in a server's reply: OpenAI's ``{"error": {...}}``, or the flat
    ``{"object": "error", "message": ...}`` of older vLLM and SGLang, else the reply
    itself as the message."""
    fields = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(fields, dict):
        fields = reply if isinstance(reply, dict) and "message" in reply else {"message": reply}
    return OpenAIRequestError(str(fields.get("message")), status, fields.get("type"),
                              fields.get("param"), fields.get("code"))


def _no_reply(url: str, e: BaseException, timeout: float) -> OpenAIRequestError:
    if isinstance(e, asyncio.TimeoutError):
        return OpenAIRequestError(f"{url}: no complete reply within {timeout:g} s")
    return OpenAIRequestError(f"{url}: {type(e).__name__}: {e}")
