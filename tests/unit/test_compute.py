"""hetis/model/compute.py: where a process's tensor work runs, and the OpenMP teams it leaves."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hetis.model import compute


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settle(expect, timeout=5.0) -> int:
    """The OS thread count once it equals ``expect`` (workers exit asynchronously), or the last seen."""
    deadline = time.monotonic() + timeout
    n = os_threads()
    while n != expect and time.monotonic() < deadline:
        time.sleep(0.01)
        n = os_threads()
    return n


def steady() -> int:
    """The OS thread count once it has not changed for 0.2 s (an earlier test's threads end)."""
    n, since = os_threads(), time.monotonic()
    while time.monotonic() - since < 0.2:
        time.sleep(0.02)
        if os_threads() != n:
            n, since = os_threads(), time.monotonic()
    return n


def parallel_work() -> float:
    a = torch.ones(1 << 22)
    return float((a * 2).sum())  # elementwise over 4M floats: an OpenMP region at 2 threads


@pytest.fixture
def two_threads():
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs /proc to count threads")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_run_is_on_the_compute_thread_reentrant_and_raises_here():
    assert not compute.on_compute_thread()
    assert compute.run(compute.on_compute_thread)
    assert compute.run(compute.run, threading.current_thread).name.startswith(compute.NAME)
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)

    @compute.on_compute
    def where():
        return threading.current_thread().name
    assert where().startswith(compute.NAME)


def test_a_thread_that_lives_on_keeps_the_team_it_started(two_threads):
    """The counter-case: what the attention worker's gRPC thread did before (this is what
    the next test's count could fail on)."""
    with ThreadPoolExecutor(1) as kept:
        kept.submit(int).result()                   # the thread itself exists
        before = steady()
        kept.submit(parallel_work).result()
        assert settle(before + 1, timeout=1.0) >= before + 1  # its OpenMP worker stays


def test_run_on_fresh_thread_leaves_no_team_behind(two_threads):
    before = steady()
    assert compute.run_on_fresh_thread(parallel_work) == 2.0 * (1 << 22)
    assert settle(before) == before
    with pytest.raises(ValueError, match="field"):
        compute.run_on_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("field")))
    assert settle(before) == before
