"""S12 deadlines: with op_timeout set, an operation still undecided that long after its first
half arrived (missing half, or requirement never held) is decided CANCEL, counted as
cancelled, and recorded in the slot's errors as timed out. An operation that only waits for a
token never times out."""

import asyncio
import time
import uuid

import pytest

from kvsched.protocol import LayerComplete
from spec_helpers import CANCEL, EXECUTE, LOAD, STORE, counters, joined, status_tuple, wait_until

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 0.2


def test_worker_half_without_transfer_half_times_out(make_scheduler):
    s = make_scheduler(op_timeout=TIMEOUT)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = uuid.uuid4()
    t0 = time.monotonic()
    w.enqueue("r", u, LOAD)
    assert wait_until(lambda: w.is_complete("r"), timeout=2.0)
    assert time.monotonic() - t0 >= TIMEOUT * 0.9
    st = w.slot_status("r")
    assert (st.expected, st.cancelled) == (1, 1)
    (eu, msg), = st.errors
    assert eu == u and "timed out" in msg
    c = counters(s)
    assert (c["cancelled"], c["timed_out"]) == (1, 1)
    assert w.take_finished() == ["r"]
    assert t.schedule("r", u).wait(0) is CANCEL  # its late transfer half


def test_transfer_half_without_worker_half_times_out(make_scheduler):
    s = make_scheduler(op_timeout=TIMEOUT)
    w, t = s.worker, s.transfer
    u = uuid.uuid4()
    t0 = time.monotonic()
    h = t.schedule("r", u)
    assert h.wait(2.0) is CANCEL
    assert time.monotonic() - t0 >= TIMEOUT * 0.9
    c = counters(s)
    assert (c["cancelled"], c["timed_out"]) == (1, 1)
    # Decision: the worker half arriving later joins the cancelled (held) outcome, with its
    # timed-out error, so the slot completes instead of waiting for a half that was cancelled.
    w.create_slot("r")
    w.enqueue("r", u, LOAD)
    assert w.is_complete("r")
    st = w.slot_status("r")
    assert st.cancelled == 1 and "timed out" in st.errors[0][1]
    assert counters(s)["cancelled"] == 1  # counted once


def test_requirement_that_never_holds_times_out(make_scheduler):
    s = make_scheduler(op_timeout=TIMEOUT)
    w = s.worker
    w.create_slot("r")
    u, h = joined(s, "r", STORE, LayerComplete(3, 1))
    w.start_next_iteration()
    assert h.wait(2.0) is CANCEL
    st = w.slot_status("r")
    assert st.cancelled == 1 and st.errors[0][0] == u and "timed out" in st.errors[0][1]
    w.mark_layer_complete(0)  # progress after the timeout changes nothing
    assert status_tuple(s, "r")[:4] == (1, 0, 0, 1)


def test_waiting_for_a_token_never_times_out(make_scheduler):
    s = make_scheduler(op_timeout=TIMEOUT, max_inflight=1)
    w = s.worker
    w.create_slot("r")
    _, h_exec = joined(s, "r", LOAD)
    _, h_ready = joined(s, "r", STORE)
    assert h_exec.wait(1) is EXECUTE
    time.sleep(TIMEOUT * 2.5)
    assert h_ready.decision is None  # ready, only waiting for the token
    assert h_exec.decision is EXECUTE  # executing is never timed out either
    h_exec.mark_complete()
    assert h_ready.wait(1) is EXECUTE
    h_ready.mark_complete()
    assert status_tuple(s, "r")[:4] == (2, 2, 0, 0)
    assert counters(s)["timed_out"] == 0


def test_joined_in_time_does_not_time_out(make_scheduler):
    s = make_scheduler(op_timeout=TIMEOUT)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = uuid.uuid4()
    h = t.schedule("r", u, requirement=LayerComplete(0, 1))
    time.sleep(TIMEOUT / 4)
    w.enqueue("r", u, LOAD)
    w.start_next_iteration()
    w.mark_layer_complete(0)
    assert h.wait(1) is EXECUTE
    time.sleep(TIMEOUT * 1.5)
    h.mark_complete()
    assert status_tuple(s, "r")[:4] == (1, 1, 0, 0)


def test_no_timeout_by_default(sched):
    h = sched.transfer.schedule("r", uuid.uuid4())
    sched.worker.create_slot("r")
    sched.worker.enqueue("r", uuid.uuid4(), LOAD)
    time.sleep(0.3)
    assert h.decision is None
    assert not sched.worker.is_complete("r")
    assert counters(sched)["cancelled"] == 0


def test_timeout_resolves_await_without_other_calls(make_scheduler):
    """Nobody calls into the scheduler: the deadline still fires and wakes the awaiting task."""
    s = make_scheduler(op_timeout=TIMEOUT)
    h = s.transfer.schedule("r", uuid.uuid4())

    async def main():
        return await asyncio.wait_for(h, 3)

    t0 = time.monotonic()
    assert asyncio.run(main()) is CANCEL
    assert time.monotonic() - t0 < 2.0
