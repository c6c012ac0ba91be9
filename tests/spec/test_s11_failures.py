"""S11 failures reach the engine: a failed or dropped transfer is visible per slot in
slot_status(rid).errors, as (uuid, message), so the engine can recompute."""

import gc
import uuid

import pytest

from spec_helpers import EXECUTE, IMMEDIATE, LOAD, STORE, counters, joined, wait_until

pytestmark = pytest.mark.timeout(60)


def test_failure_with_exception(sched):
    w = sched.worker
    w.create_slot("r")
    u, h = joined(sched, "r", LOAD)
    assert h.wait(1) is EXECUTE
    h.mark_complete(error=RuntimeError("dma fault at block 7"))
    st = w.slot_status("r")
    assert (st.expected, st.completed, st.failed, st.cancelled) == (1, 0, 1, 0)
    assert len(st.errors) == 1
    eu, msg = st.errors[0]
    assert isinstance(eu, uuid.UUID) and eu == u
    assert "dma fault at block 7" in msg
    assert w.is_complete("r")  # failed counts as ended: the engine learns it and recomputes
    assert w.take_finished() == ["r"]
    assert counters(sched)["failed"] == 1


def test_failure_with_string(sched):
    w = sched.worker
    w.create_slot("r")
    u, h = joined(sched, "r", STORE)
    assert h.wait(1) is EXECUTE
    h.mark_complete(error="host pool full")
    assert w.slot_status("r").errors == [(u, w.slot_status("r").errors[0][1])]
    assert "host pool full" in w.slot_status("r").errors[0][1]


def test_only_failures_are_listed(sched):
    w = sched.worker
    w.create_slot("r")
    failed = {}
    for i in range(6):
        u, h = joined(sched, "r", LOAD)
        assert h.wait(1) is EXECUTE
        if i % 2:
            h.mark_complete(error=f"boom {i}")
            failed[u] = f"boom {i}"
        else:
            h.mark_complete()
    st = w.slot_status("r")
    assert (st.completed, st.failed) == (3, 3)
    assert {u for u, _ in st.errors} == set(failed)
    for u, msg in st.errors:
        assert failed[u] in msg


def test_failure_in_with_block(sched):
    w = sched.worker
    w.create_slot("r")
    u, h = joined(sched, "r", LOAD)
    assert h.wait(1) is EXECUTE
    with pytest.raises(OSError):
        with h:
            raise OSError("copy engine reset")
    (eu, msg), = w.slot_status("r").errors
    assert eu == u and "copy engine reset" in msg


def test_dropped_handle_is_visible(sched):
    w = sched.worker
    w.create_slot("r")
    u, h = joined(sched, "r", STORE)
    assert h.wait(1) is EXECUTE
    del h
    gc.collect()
    assert wait_until(lambda: w.slot_status("r").failed == 1, timeout=1.0)
    (eu, msg), = w.slot_status("r").errors
    assert eu == u and "HandleDroppedError" in msg
    assert w.is_complete("r")


def test_immediate_failure_held_until_worker_half(sched):
    w, t = sched.worker, sched.transfer
    u = uuid.uuid4()
    t.schedule("r", u, mode=IMMEDIATE).mark_complete(error="nvlink error")
    w.create_slot("r")
    assert w.slot_status("r").errors == []
    w.enqueue("r", u, LOAD, mode=IMMEDIATE)
    (eu, msg), = w.slot_status("r").errors
    assert eu == u and "nvlink error" in msg


def test_errors_are_a_snapshot(sched):
    """slot_status returns a copy: mutating it does not change the scheduler."""
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", LOAD)
    assert h.wait(1) is EXECUTE
    h.mark_complete(error="x")
    st = w.slot_status("r")
    st.errors.clear()
    assert len(w.slot_status("r").errors) == 1
