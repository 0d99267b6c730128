"""The serving loop: an ``Engine`` stepped by one thread, requests in and out through queues.

The router runs it over a remote dense worker; ``hetis bench --engine local``
runs it over ``hetis.LLM``'s in-process engine. All engine state is touched by
the loop thread only; callers talk to it through a command queue and give each
request a ``sink``, a callable the loop thread hands every ``StepOutput`` (or an
Exception) to: ``queue.Queue.put`` for threads, or a
``loop.call_soon_threadsafe`` into an ``asyncio.Queue`` for the router's
event loop. Nothing here blocks the caller: :meth:`ServingLoop.add` returns a
future that resolves when the request has been admitted between two steps.
Whoever needs to read engine state (cluster status) asks the loop thread with
:meth:`ServingLoop.call`, which runs a function between two steps.

With several serving instances (dense workers) their steps run concurrently:
the loop thread schedules an instance's step (``Engine.begin_step``) whenever
that instance is idle and hands it to the instance's own executor thread; a
finished step comes back through a queue and is closed on the loop thread
(``Engine.end_step``). So engine state is still touched by the loop thread
only, and a slow instance never holds back a fast one. A failed step is
handled for its instance alone: a lost attention worker (``DevicesLost``) or
a lost dense worker (``InstanceLost``) recomputes what lived there elsewhere;
any other failure fails that instance's requests.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

from hetis.engine.engine import Engine, StepOutput
from hetis.engine.instance import Planned
from hetis.engine.sampling import SamplingParams
from hetis.engine.step import DevicesLost, InstanceLost, StepFailed
from hetis.model import compute

log = logging.getLogger("hetis.serving")

RUNNING = Gauge("hetis:num_requests_running", "requests in the running batch")
WAITING = Gauge("hetis:num_requests_waiting", "requests waiting to be scheduled")
PROMPT_TOKENS = Counter("hetis:prompt_tokens_total", "prompt tokens admitted")
GEN_TOKENS = Counter("hetis:generation_tokens_total", "tokens generated")
SUCCESS = Counter("hetis:request_success_total", "finished requests", ["finished_reason"])
PREEMPTIONS = Counter("hetis:num_preemptions_total", "preemptions by recompute")
MIGRATIONS = Counter("hetis:migrations_total", "head-group moves (live KV migration)")
MIGRATED = Counter("hetis:migrated_kv_bytes_total", "KV bytes moved by head-group migration")
RECOVERED = Counter("hetis:recovered_sequences_total",
                    "sequences recomputed elsewhere after a device was lost")
TTFT = Histogram("hetis:time_to_first_token_seconds", "time to first token",
                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
E2E = Histogram("hetis:e2e_request_latency_seconds", "request latency",
                buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None
    sink: Callable[[object], None]
    done: Future = field(default_factory=Future)


@dataclass
class _Call:
    fn: Callable[[Engine], object]
    done: Future = field(default_factory=Future)


class QueueFull(Exception):
    pass


class ServingLoop:
    """Steps every instance of an engine on its own thread, opened and closed on the loop
    thread (``begin_step``/``end_step``); requests come and go through queues."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.commands: queue.Queue = queue.Queue()
        self.outputs: dict[str, Callable[[object], None]] = {}
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._loop, name="serving-loop", daemon=True)
        self.lock = threading.Lock()
        self._preemptions = self._migrations = self._migrated = 0
        self.pending_adds = 0
        self.inflight: dict[int, Planned] = {}       # id(instance) -> its step in flight
        self.finished: queue.Queue = queue.Queue()   # (Planned, Future) of steps done
        self.pools: dict[int, ThreadPoolExecutor] = {}  # id(executor) -> its step thread

    def start(self) -> "ServingLoop":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        self.thread.join(timeout=10)
        for pool in self.pools.values():
            if pool is not compute.pool():   # the process's, not this loop's
                pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ called by handlers
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            prompt: str | None, sink: Callable[[object], None]) -> Future:
        """Queue a request without waiting. Raises QueueFull at once when ``max_queue``
        requests already wait; the returned future resolves when the engine has admitted
        the request, or raises its validation error (ValueError)."""
        if self.error:
            raise RuntimeError(self.error)
        cmd = _Add(request_id, prompt_ids, params, prompt, sink)
        with self.lock:
            if self.engine.num_waiting + self.pending_adds >= self.max_queue:
                raise QueueFull(f"queue is full ({self.max_queue} waiting requests); retry later")
            self.pending_adds += 1
            self.commands.put(cmd)
        self.wake.set()
        return cmd.done

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               prompt: str | None) -> "queue.Queue":
        """:meth:`add` for threads: wait for admission; outputs arrive on the returned queue."""
        out: queue.Queue = queue.Queue()
        self.add(request_id, prompt_ids, params, prompt, out.put).result(timeout=600)
        return out

    def abort(self, request_id: str, reason: str | None = None) -> None:
        """Drop a request; ``reason`` says the caller finished it (a stop string it found),
        so it counts as a finished request with that reason instead of an abort."""
        self.commands.put(("abort", request_id, reason))
        self.wake.set()

    def call(self, fn: Callable[[Engine], object], timeout: float = 30.0):
        """``fn(engine)`` run on the loop thread between steps; its result (or exception)."""
        if not self.thread.is_alive():
            raise RuntimeError("the serving loop is not running")
        cmd = _Call(fn)
        self.commands.put(cmd)
        self.wake.set()
        return cmd.done.result(timeout=timeout)

    # ------------------------------------------------------------ the loop
    def _drain(self) -> None:
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                with self.lock:
                    self.pending_adds -= 1
                if not cmd.done.set_running_or_notify_cancel():
                    continue  # the caller went away while it waited: never admit it
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.prompt)
                except Exception as e:  # noqa: BLE001 - reported to the caller
                    cmd.done.set_exception(e)
                    continue
                PROMPT_TOKENS.inc(len(cmd.prompt_ids))
                self.outputs[cmd.request_id] = cmd.sink
                cmd.done.set_result(True)
            elif isinstance(cmd, _Call):
                try:
                    cmd.done.set_result(cmd.fn(self.engine))
                except Exception as e:  # noqa: BLE001 - reported to the caller
                    cmd.done.set_exception(e)
            else:
                _, rid, reason = cmd
                seq = self.engine.seqs.get(rid)
                if self.engine.abort(rid):
                    if reason is None:
                        log.info("aborted %s", rid)
                    else:  # finished by the caller (a stop string): count it as finished
                        SUCCESS.labels(reason).inc()
                        E2E.observe(time.monotonic() - seq.arrival)
                self.outputs.pop(rid, None)

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # a bug: say so (health goes NOT_SERVING), then re-raise
            self.error = f"the serving loop stopped: {type(e).__name__}: {e}"
            log.exception(self.error)
            raise

    def _run(self) -> None:
        eng = self.engine
        while not self.stopped.is_set():
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - one bad command must not stop the loop
                log.exception("a serving-loop command failed")
            self._collect()
            self._gauges()  # also after aborts, which change the batch without a step
            self._start_steps()
            if self.inflight:
                self.wake.wait(1.0)  # a step's end, or a command, wakes us
            else:
                self.wake.wait(0.005 if eng.has_unfinished() else 0.5)
            self.wake.clear()

    def _start_steps(self) -> None:
        """Give every idle live instance its next step."""
        eng = self.engine
        for i, inst in enumerate(eng.instances):
            if inst.lost or id(inst) in self.inflight:
                continue
            planned, rejected = eng.begin_step(i)
            self._emit(rejected)
            if planned is None:
                continue
            self.inflight[id(inst)] = planned
            pool = self.pools.get(id(inst.executor))
            if pool is None:   # an in-process model steps on the compute thread (hetis/model/compute.py)
                pool = self.pools[id(inst.executor)] = compute.pool() \
                    if getattr(inst.executor, "on_compute_thread", False) \
                    else ThreadPoolExecutor(1, thread_name_prefix=f"step-{inst.name}")
            fut = pool.submit(inst.executor.execute, planned.step)
            fut.add_done_callback(lambda f, p=planned: (self.finished.put((p, f)), self.wake.set()))

    def _collect(self) -> None:
        """Close the steps that are done (on this thread: the only one touching the engine)."""
        while True:
            try:
                planned, fut = self.finished.get_nowait()
            except queue.Empty:
                return
            self.inflight.pop(id(planned.owner), None)
            err = fut.exception()
            if err is None:
                self._emit(self.engine.end_step(planned, fut.result()))
            else:
                # moves between devices that did not fail were done (the step ran to its end)
                lost = set(err.devices) if isinstance(err, DevicesLost) and err.ran else None
                self.engine.end_step(planned, None, lost)
                if self.engine.instances[planned.instance] is planned.owner:
                    self._failed(planned.instance, err)
                else:  # its instance was dropped and replaced meanwhile: old news
                    log.info("a step of a replaced instance failed: %s", err)
            eng = self.engine
            n, m, b = eng.num_preemptions, eng.migrations, eng.migrated_bytes
            PREEMPTIONS.inc(max(0, n - self._preemptions))
            MIGRATIONS.inc(m - self._migrations)
            MIGRATED.inc(b - self._migrated)
            self._preemptions, self._migrations, self._migrated = n, m, b

    def _emit(self, outs: list[StepOutput]) -> None:
        eng = self.engine
        for o in outs:
            sink = self.outputs.get(o.seq.request_id)
            GEN_TOKENS.inc(len(o.new_token_ids))
            if sink is not None:
                sink(o)
            if o.finished:
                self.outputs.pop(o.seq.request_id, None)
                eng.release(o.seq)
                SUCCESS.labels(o.seq.finish_reason).inc()
                E2E.observe(time.monotonic() - o.seq.arrival)
            if o.new_token_ids and len(o.seq.output_token_ids) == 1:
                TTFT.observe(o.seq.first_token_time - o.seq.arrival)

    def _gauges(self) -> None:
        RUNNING.set(self.engine.num_running)
        WAITING.set(self.engine.num_waiting)

    def _failed(self, index: int, e: BaseException) -> None:
        eng = self.engine
        if isinstance(e, DevicesLost):  # recover: recompute what lived there, fail nothing
            moved = eng.lose_devices(e.devices)
            RECOVERED.inc(len(moved))
            log.warning("%s; devices %s dropped, %d sequences recomputed elsewhere", e, e.devices,
                        len(moved))
            return
        if isinstance(e, InstanceLost):
            moved = eng.lose_instance(index)
            RECOVERED.inc(len(moved))
            log.warning("%s; instance %s dropped, %d sequences recomputed on the others", e,
                        eng.instances[index].name, len(moved))
            return
        # the step failed (the executor said so, or a bug): fail this instance's requests,
        # keep serving the next ones
        msg = str(e) if isinstance(e, StepFailed) else f"step failed: {type(e).__name__}: {e}"
        log.error(msg, exc_info=None if isinstance(e, StepFailed) else e)
        for rid, seq in list(eng.seqs.items()):
            if eng.owner.get(seq.seq_id, 0) == index:
                sink = self.outputs.pop(rid, None)
                if sink is not None:
                    sink(RuntimeError(msg))
                eng.abort(rid)
