"""The one thread a process's tensor work runs on (``hetis-compute``).

PyTorch's CPU operations run their parallel parts on OpenMP (libgomp), and libgomp
keeps a separate team of worker threads for every thread that has started a parallel
region. Once a process holds more OpenMP threads than it has cores, libgomp stops
spinning between regions (GOMP_SPINCOUNT's throttle: 100 spins instead of 300 000), so
every region then pays a futex wake-up of its workers; a decode step has hundreds of
regions. Loading the model on one thread and stepping it on another is enough: one
SmolLM2-135M stream through ``hetis bench --engine local`` took 25 ms a token that way
against 15 ms with both on one thread (2 cores, 2 torch threads; docs/cpu.md).

So ``hetis.LLM`` builds its model and runs ``generate``/``chat`` here, and the serving
loop runs local executors' steps here: one OpenMP team per process. ``run`` is
re-entrant (called on this thread it just calls).

A process whose tensor work belongs to several long-lived threads (the attention worker:
one loop per dense worker, each blocking on its channel between layers) cannot hand every
layer to one thread: a hand-off costs about 0.1 ms, more than the wake-ups it saves
(30 layers: 11.7 ms a batch-32 step against 8.6 ms, docs/cpu.md). There each loop steps on
its own thread, and one-off work from a thread that lives on (a gRPC handler) goes through
``run_on_fresh_thread``: libgomp frees a thread's team when the thread exits, so the
handler's parallel regions leave no team behind.
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

NAME = "hetis-compute"
_pool = ThreadPoolExecutor(1, thread_name_prefix=NAME)


def pool() -> ThreadPoolExecutor:
    """The single-thread executor itself (for ``submit``)."""
    return _pool


def on_compute_thread() -> bool:
    return threading.current_thread().name.startswith(NAME)


def run(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the compute thread; its result, or its exception raised here."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return _pool.submit(fn, *args, **kwargs).result()


def run_on_fresh_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a new thread that ends with it (its OpenMP team ends too);
    its result, or its exception raised here."""
    out: list = []

    def target():
        try:
            out.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            out.append((False, e))

    t = threading.Thread(target=target, name=f"{NAME}-once", daemon=True)
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def on_compute(fn):
    """Decorator: the function always runs on the compute thread (``run``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run(fn, *args, **kwargs)
    return wrapper
