"""S10 close: decides every undecided handle CANCEL, wakes every waiter, and makes later calls
on either side raise SchedulerClosedError; idempotent; the Scheduler is a context manager."""

import asyncio
import threading
import time
import uuid

import pytest

from kvsched.errors import ProtocolError, SchedulerClosedError
from kvsched.protocol import LayerComplete
from spec_helpers import CANCEL, EXECUTE, LOAD, STORE, check_message, counters, joined

pytestmark = pytest.mark.timeout(60)


async def _await(h):
    return await h


def test_close_wakes_every_waiter(make_scheduler):
    s = make_scheduler()
    t = s.transfer
    h_wait, h_await = t.schedule("r", uuid.uuid4()), t.schedule("r", uuid.uuid4())
    results, done_at = {}, {}

    def waiter():
        results["wait"] = h_wait.wait()  # no timeout: only close can end it
        done_at["wait"] = time.monotonic()

    def poller():
        # Decision: a poll blocked when close() happens may return (whatever was queued, e.g.
        # the CANCELs close made) or raise SchedulerClosedError; it must do so promptly.
        try:
            results["poll"] = t.poll(timeout=10)
        except SchedulerClosedError as e:
            results["poll"] = e
        done_at["poll"] = time.monotonic()

    def awaiter():
        results["await"] = asyncio.run(asyncio.wait_for(_await(h_await), 10))
        done_at["await"] = time.monotonic()

    threads = [threading.Thread(target=f) for f in (waiter, poller, awaiter)]
    for th in threads:
        th.start()
    time.sleep(0.1)
    assert not results  # all three are blocked
    closed_at = time.monotonic()
    s.close()
    for th in threads:
        th.join(5)
        assert not th.is_alive()
    assert results["wait"] is CANCEL
    assert results["await"] is CANCEL
    assert isinstance(results["poll"], (list, SchedulerClosedError))
    assert all(ts - closed_at < 1.0 for ts in done_at.values()), done_at


def test_calls_after_close_raise(make_scheduler):
    s = make_scheduler(layer_names=["a"])
    w, t = s.worker, s.transfer
    w.create_slot("r")
    w.start_next_iteration()
    s.close()
    u = uuid.uuid4()
    for fn, args, rid, uu in [
        (w.create_slot, ("x",), "x", None), (w.enqueue, ("r", u, LOAD), "r", u),
        (t.schedule, ("r", u), "r", u), (w.is_complete, ("r",), "r", None),
        (w.slot_status, ("r",), "r", None), (w.cancel_slot, ("r",), "r", None),
        (w.remove_slot, ("r",), "r", None), (w.start_next_iteration, (), None, None),
        (w.mark_layer_complete, (0,), None, None), (w.mark_layer_complete, ("a",), None, None),
        (w.mark_iteration_complete, (), None, None), (w.take_finished, (), None, None),
        (t.poll, (), None, None),
    ]:
        with pytest.raises(SchedulerClosedError) as ei:
            fn(*args)
        check_message(ei.value, rid, uu)


def test_close_is_idempotent_and_stats_survive(make_scheduler):
    s = make_scheduler()
    s.worker.create_slot("r")
    _, h = joined(s, "r", LOAD)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
    s.close()
    s.close()
    assert counters(s)["completed"] == 1


def test_context_manager(make_scheduler):
    s = make_scheduler()
    with s as entered:
        assert entered is s
        s.worker.create_slot("r")
        h = s.transfer.schedule("r", uuid.uuid4())
    assert h.wait(1) is CANCEL
    with pytest.raises(SchedulerClosedError):
        s.worker.create_slot("again")


def test_close_cancels_undecided_operations(make_scheduler):
    s = make_scheduler(max_inflight=1)
    w = s.worker
    w.create_slot("r")
    _, h_exec = joined(s, "r", LOAD)
    _, h_ready = joined(s, "r", LOAD)                     # waiting for the token
    _, h_gated = joined(s, "r", STORE, LayerComplete(0, 4))  # waiting for its requirement
    assert h_exec.wait(1) is EXECUTE
    s.close()
    assert h_ready.wait(0) is CANCEL and h_gated.wait(0) is CANCEL
    assert h_exec.decision is EXECUTE  # close never recalls a running copy
    c = counters(s)
    assert c["cancelled"] == 2 and c["inflight"] == 1


def test_mark_after_close_is_counted(make_scheduler):
    """Executing copies can still report their end after close()."""
    s = make_scheduler()
    s.worker.create_slot("r")
    _, h = joined(s, "r", LOAD)
    _, h2 = joined(s, "r", LOAD)
    _, hc = joined(s, "r", STORE, LayerComplete(0, 4))
    assert h.wait(1) is EXECUTE and h2.wait(1) is EXECUTE
    s.close()
    h.mark_complete()
    h2.mark_complete(error="copy aborted")
    assert hc.wait(0) is CANCEL
    with pytest.raises(ProtocolError):
        hc.mark_complete()
    with pytest.raises(ProtocolError):
        h.mark_complete()
    c = counters(s)
    assert (c["completed"], c["failed"], c["cancelled"], c["inflight"]) == (1, 1, 1, 0)
    assert h.wait(0) is EXECUTE


def test_close_racing_calls(make_scheduler):
    """Threads hammering both sides while close() runs: every call either works or raises
    SchedulerClosedError; nothing hangs, nothing else is raised."""
    s = make_scheduler(max_inflight=2)
    w, t = s.worker, s.transfer
    errors, stop = [], threading.Event()

    def hammer(i):
        n = 0
        try:
            while not stop.is_set():
                rid = f"t{i}.{n}"
                n += 1
                try:
                    w.create_slot(rid)
                    u = uuid.uuid4()
                    h = t.schedule(rid, u)
                    w.enqueue(rid, u, LOAD)
                    if h.wait(1) is EXECUTE:
                        h.mark_complete()  # the owner marks, even if a poller took it too
                except SchedulerClosedError:
                    pass
        except BaseException as e:
            errors.append(e)

    def poller():
        try:
            while not stop.is_set():
                try:
                    t.poll(max_items=8, timeout=0.001)
                except SchedulerClosedError:
                    pass
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=poller))
    for th in threads:
        th.start()
    time.sleep(0.1)
    s.close()
    time.sleep(0.05)
    stop.set()
    for th in threads:
        th.join(5)
        assert not th.is_alive()
    assert not errors, errors
    c = counters(s)
    assert c["completed"] > 0
    assert c["inflight"] == 0
