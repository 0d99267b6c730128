"""The serving loop over a fake executor: streaming, aborts, snapshots, failed steps, a full queue."""
from __future__ import annotations

import queue
import time

import pytest
from prometheus_client import REGISTRY

from hetis.engine.sampling import SamplingParams
from hetis.engine.serving import QueueFull, ServingLoop
from hetis.engine.step import StepFailed
from tests.helpers.fakes import FakeExecutor, fake_engine


def drain(q: queue.Queue, timeout: float = 10.0) -> list:
    out = []
    while True:
        o = q.get(timeout=timeout)
        out.append(o)
        if isinstance(o, Exception) or o.finished:
            return out


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def loop():
    loops = []

    def make(executor=None, max_queue: int = 16, **cfg):
        lp = ServingLoop(fake_engine(executor=executor, pinned=[0, 0, 0], **cfg), max_queue).start()
        loops.append(lp)
        return lp
    yield make
    for lp in loops:
        lp.stop()


def running_gauge() -> float:
    return REGISTRY.get_sample_value("hetis:num_requests_running")


def test_streams_every_token_then_finishes(loop):
    lp = loop()
    outs = drain(lp.submit("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True), None))
    assert [t for o in outs for t in o.new_token_ids] == [4, 5, 6, 7, 8]
    assert outs[-1].finished and outs[-1].seq.finish_reason == "length"
    assert "".join(o.text_delta for o in outs) == "efghi"


def test_bad_input_is_refused_at_submit(loop):
    lp = loop()
    with pytest.raises(ValueError, match="prompt_token_ids"):
        lp.submit("bad", [1, 10 ** 6], SamplingParams(), None)
    with pytest.raises(ValueError, match="request_id"):
        q = lp.submit("dup", [1], SamplingParams(max_tokens=10 ** 6, ignore_eos=True), None)
        lp.submit("dup", [1], SamplingParams(), None)
    assert q.get(timeout=5).new_token_ids  # the first "dup" is unaffected


def test_abort_frees_kv_and_the_running_gauge(loop):
    lp = loop(executor=FakeExecutor(delay=0.002))
    q = lp.submit("long", [1, 2, 3], SamplingParams(max_tokens=10 ** 6, ignore_eos=True), None)
    q.get(timeout=5)
    assert running_gauge() == 1
    snap = lp.call(lambda eng: eng.snapshot())
    assert snap.running == 1 and snap.devices[0].resident == {"long": [0, 1, 2]}
    assert snap.devices[0].used_tokens > 0
    lp.abort("long")
    wait_for(lambda: running_gauge() == 0)  # no step follows an abort: the gauge must not go stale
    snap = lp.call(lambda eng: eng.snapshot())
    assert snap.running == 0 and not snap.devices[0].resident
    # its blocks come back once the step in flight during the abort is over (the fence)
    wait_for(lambda: lp.call(lambda eng: eng.snapshot()).devices[0].used_tokens == 0)


def test_a_failed_step_fails_the_requests_in_flight_and_the_loop_goes_on(loop):
    fail = {"on": True}

    class Flaky(FakeExecutor):
        def execute(self, step):
            if fail["on"] and step.chunks:
                raise StepFailed("dense worker step failed: UNAVAILABLE: gone")
            return super().execute(step)

    lp = loop(executor=Flaky())
    outs = drain(lp.submit("a", [1, 2], SamplingParams(max_tokens=3), None))
    assert isinstance(outs[-1], RuntimeError) and "UNAVAILABLE: gone" in str(outs[-1])
    fail["on"] = False
    outs = drain(lp.submit("b", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True), None))
    assert outs[-1].finished and len(outs[-1].seq.output_token_ids) == 3


def test_queue_full_beyond_max_queue(loop):
    lp = loop(executor=FakeExecutor(delay=0.01), max_queue=1, max_num_seqs=1)
    forever = SamplingParams(max_tokens=10 ** 6, ignore_eos=True)
    q = lp.submit("running", [1], forever, None)
    q.get(timeout=5)
    lp.submit("waiting", [1], forever, None)
    with pytest.raises(QueueFull, match="1 waiting"):
        lp.submit("refused", [1], forever, None)


def test_any_step_exception_fails_the_batch_not_the_loop(loop):
    class Buggy(FakeExecutor):
        def execute(self, step):
            if step.chunks and step.chunks[0].token_ids == [13]:
                raise IndexError("a bug in the executor")
            return super().execute(step)

    lp = loop(executor=Buggy())
    outs = drain(lp.submit("bad", [13], SamplingParams(max_tokens=3), None))
    assert isinstance(outs[-1], RuntimeError) and "IndexError: a bug" in str(outs[-1])
    outs = drain(lp.submit("good", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True), None))
    assert outs[-1].finished and lp.thread.is_alive()


def test_a_lost_device_recomputes_its_sequences_elsewhere_and_fails_nothing(loop):
    from hetis.engine.step import DevicesLost

    class LosesDevice2(FakeExecutor):
        lost = False

        def execute(self, step):
            if not self.lost and len(self.steps) == 4 and step.work[2]:
                self.lost = True
                raise DevicesLost([2], "attention worker attn-1 lost")
            assert not step.work[2] or not self.lost, "work placed on a lost device"
            return super().execute(step)

    forever = dict(max_tokens=12, ignore_eos=True)
    ex = LosesDevice2()
    lp = ServingLoop(fake_engine(devices=3, policy="round-robin", executor=ex), 16).start()
    try:
        queues = [lp.submit(f"r{i}", [1 + i, 2, 3], SamplingParams(**forever), None) for i in range(4)]
        outs = [drain(q) for q in queues]
        snap = lp.call(lambda eng: eng.snapshot())
    finally:
        lp.stop()
    assert ex.lost
    for i, o in enumerate(outs):
        assert o[-1].finished and not isinstance(o[-1], Exception)
        assert [t for x in o for t in x.new_token_ids] == [(p + 1) % 50 for p in range(3, 15)]
    assert snap.devices[2].used_tokens == 0


def test_a_caller_gone_before_admission_is_never_admitted_and_the_loop_lives_on(loop):
    """The router cancels the admission future when its client hangs up while the request
    waits for the loop (asyncio.wrap_future); the loop used to die on it (InvalidStateError)
    with health still SERVING and the request's KV never freed."""
    import threading
    lp = loop()
    busy, release = threading.Event(), threading.Event()

    def hold(eng):  # keeps the loop thread busy while the request is queued and cancelled
        busy.set()
        release.wait(10)
    holder = threading.Thread(target=lp.call, args=(hold,))
    holder.start()
    assert busy.wait(10)
    fut = lp.add("gone", [1, 2, 3], SamplingParams(max_tokens=4), None, lambda o: None)
    assert fut.cancel()
    release.set()
    holder.join()
    out: queue.Queue = queue.Queue()
    lp.add("next", [4, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True), None,
           out.put).result(timeout=10)  # the old loop thread was dead by now: a timeout
    assert len([o for o in drain(out) if o.new_token_ids]) == 3
    assert lp.thread.is_alive() and lp.error is None
    assert "gone" not in lp.call(lambda eng: list(eng.seqs))


def test_a_request_finished_by_its_caller_counts_as_finished_not_aborted(loop):
    """The router finds stop strings itself and aborts with reason "stop": the request is
    gone from the engine and counted under that finish reason."""
    def finished(reason):
        return REGISTRY.get_sample_value("hetis:request_success_total",
                                         {"finished_reason": reason}) or 0.0
    lp = loop(executor=FakeExecutor(delay=0.02))
    before = finished("stop")
    out = lp.submit("s", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True), None)
    out.get(timeout=10)
    lp.abort("s", reason="stop")
    wait_for(lambda: not lp.call(lambda eng: list(eng.seqs)))
    assert finished("stop") == before + 1
