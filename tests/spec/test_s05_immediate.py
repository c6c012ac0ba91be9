"""S5 immediate: an IMMEDIATE transfer half is decided EXECUTE at birth; its outcome counts
once the worker half exists, in whichever order they come (an early outcome is held)."""

import gc

import pytest

from spec_helpers import EXECUTE, IMMEDIATE, LOAD, STORE, counters, status_tuple, wait_until

pytestmark = pytest.mark.timeout(60)


def test_immediate_handle_is_decided_at_birth(sched, new_uuid):
    h = sched.transfer.schedule("r", new_uuid(), mode=IMMEDIATE)  # no slot, no worker half
    assert h.decision is EXECUTE
    assert h.wait(0) is EXECUTE
    assert sched.transfer.poll() == []  # delivered at birth: never polled


def test_outcome_before_slot_and_worker_half_is_held(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    u = new_uuid()
    h = t.schedule("r", u, mode=IMMEDIATE)
    h.mark_complete()  # before create_slot
    w.create_slot("r")
    assert w.is_complete("r") and status_tuple(sched, "r")[:4] == (0, 0, 0, 0)
    w.enqueue("r", u, LOAD, mode=IMMEDIATE)
    assert status_tuple(sched, "r")[:4] == (1, 1, 0, 0)
    assert w.is_complete("r")
    assert w.take_finished() == ["r"]


def test_outcome_after_slot_before_worker_half_is_held(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    h = t.schedule("r", u, mode=IMMEDIATE)
    h.mark_complete(error=OSError("link down"))
    assert status_tuple(sched, "r")[:4] == (0, 0, 0, 0)
    assert w.take_finished() == []
    w.enqueue("r", u, STORE, mode=IMMEDIATE)
    st = w.slot_status("r")
    assert (st.expected, st.failed) == (1, 1)
    assert st.errors[0][0] == u and "link down" in st.errors[0][1]
    assert w.take_finished() == ["r"]


def test_worker_half_first_then_immediate(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, LOAD, mode=IMMEDIATE)
    assert not w.is_complete("r")
    h = t.schedule("r", u, mode=IMMEDIATE)
    assert h.decision is EXECUTE
    assert not w.is_complete("r")  # running, not ended
    h.mark_complete()
    assert w.is_complete("r")
    assert status_tuple(sched, "r")[:4] == (1, 1, 0, 0)
    assert counters(sched)["completed"] == 1


def test_cancel_never_touches_immediate(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, LOAD, mode=IMMEDIATE)
    h = t.schedule("r", u, mode=IMMEDIATE)
    w.cancel_slot("r")
    assert h.decision is EXECUTE
    assert not w.is_complete("r")  # the copy is still running: blocks are not reusable yet
    h.mark_complete()
    assert w.is_complete("r")
    assert status_tuple(sched, "r")[:4] == (1, 1, 0, 0)


def test_immediate_after_cancel_still_executes(sched, new_uuid):
    """The transfer engine runs it already, so even a late IMMEDIATE half is EXECUTE."""
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    w.cancel_slot("r")
    u = new_uuid()
    h = t.schedule("r", u, mode=IMMEDIATE)
    assert h.decision is EXECUTE
    w.enqueue("r", u, LOAD, mode=IMMEDIATE)
    h.mark_complete()
    assert w.is_complete("r") and status_tuple(sched, "r")[:4] == (1, 1, 0, 0)


def test_held_outcome_only_credits_its_own_uuid(sched, new_uuid):
    """A reused rid is never credited with an outcome its worker did not enqueue."""
    w, t = sched.worker, sched.transfer
    u_old, u_new = new_uuid(), new_uuid()
    t.schedule("r", u_old, mode=IMMEDIATE).mark_complete()
    w.create_slot("r")
    w.enqueue("r", u_new, LOAD, mode=IMMEDIATE)
    assert not w.is_complete("r")
    assert status_tuple(sched, "r")[:4] == (1, 0, 0, 0)
    t.schedule("r", u_new, mode=IMMEDIATE).mark_complete()
    assert status_tuple(sched, "r")[:4] == (1, 1, 0, 0)


def test_dropped_immediate_handle_fails(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, STORE, mode=IMMEDIATE)
    h = t.schedule("r", u, mode=IMMEDIATE)
    assert h.decision is EXECUTE
    del h
    gc.collect()
    assert wait_until(lambda: w.is_complete("r"), timeout=1.0)
    st = w.slot_status("r")
    assert st.failed == 1 and "HandleDroppedError" in st.errors[0][1]


def test_many_immediate_in_both_orders(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    hs = []
    for i in range(20):
        u = new_uuid()
        if i % 2:
            w.enqueue("r", u, LOAD, mode=IMMEDIATE)
            hs.append(t.schedule("r", u, mode=IMMEDIATE))
        else:
            hs.append(t.schedule("r", u, mode=IMMEDIATE))
            if i % 4 == 0:
                hs[-1].mark_complete()  # outcome before the worker half
                hs[-1] = None
            w.enqueue("r", u, LOAD, mode=IMMEDIATE)
    for h in hs:
        if h is not None:
            assert not w.is_complete("r")
            h.mark_complete()
    assert w.is_complete("r")
    assert status_tuple(sched, "r")[:4] == (20, 20, 0, 0)
    assert counters(sched)["inflight"] == 0
