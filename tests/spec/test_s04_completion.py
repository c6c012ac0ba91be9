"""S4 exactly-once completion: every operation ends once (completed, failed, cancelled or
dropped); outcomes are tracked per uuid; is_complete and take_finished report slots exactly."""

import gc
import logging

import pytest

from kvsched.errors import ProtocolError, UnknownSlotError
from kvsched.protocol import LayerComplete
from spec_helpers import (CANCEL, EXECUTE, IMMEDIATE, LOAD, STORE, counters, joined,
                          raises_clean, status_tuple, wait_until)

pytestmark = pytest.mark.timeout(60)


def test_zero_op_slot_is_complete(sched):
    w = sched.worker
    w.create_slot("r")
    assert w.is_complete("r")
    st = w.slot_status("r")
    assert (st.expected, st.completed, st.failed, st.cancelled, st.errors) == (0, 0, 0, 0, [])
    assert w.take_finished() == []  # nothing ended, so nothing is reported
    w.remove_slot("r")


def test_unknown_rid(sched):
    w = sched.worker
    raises_clean(sched, UnknownSlotError, w.is_complete, "nope", rid="nope")
    raises_clean(sched, UnknownSlotError, w.slot_status, "nope", rid="nope")
    raises_clean(sched, UnknownSlotError, w.enqueue, "nope", "12345678-1234-5678-1234-567812345678",
                 LOAD, rid="nope", u="12345678-1234-5678-1234-567812345678")


def test_take_finished_once_per_completion(sched):
    w = sched.worker
    w.create_slot("r")
    w.create_slot("other")
    _, h1 = joined(sched, "r", LOAD)
    _, h2 = joined(sched, "r", STORE)
    _, ho = joined(sched, "other", LOAD)
    assert h1.wait(1) is EXECUTE and h2.wait(1) is EXECUTE
    h1.mark_complete()
    assert w.take_finished() == []
    h2.mark_complete(error="x")  # a failure ends the op too
    assert w.take_finished() == ["r"]
    assert w.take_finished() == []
    # the slot gets a new operation and completes again: reported again
    _, h3 = joined(sched, "r", LOAD)
    assert w.take_finished() == []
    assert h3.wait(1) is EXECUTE
    h3.mark_complete()
    assert ho.wait(1) is EXECUTE
    ho.mark_complete()
    assert sorted(w.take_finished()) == ["other", "r"]
    assert w.take_finished() == []


def test_take_finished_never_reports_removed_slot(sched):
    w = sched.worker
    w.create_slot("gone")
    w.create_slot("again")
    for rid in ("gone", "again"):
        _, h = joined(sched, rid, LOAD)
        assert h.wait(1) is EXECUTE
        h.mark_complete()
    w.remove_slot("gone")
    w.remove_slot("again")
    w.create_slot("again")  # removed and re-created before the call: not reported
    assert w.take_finished() == []


def test_stray_outcome_for_foreign_uuid_never_completes_slot(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u_mine = new_uuid()
    w.enqueue("r", u_mine, LOAD, mode=IMMEDIATE)
    stray = t.schedule("r", new_uuid(), mode=IMMEDIATE)  # the worker never enqueued this uuid
    assert stray.decision is EXECUTE
    stray.mark_complete()
    assert not w.is_complete("r")
    assert status_tuple(sched, "r")[:4] == (1, 0, 0, 0)
    assert w.take_finished() == []
    mine = t.schedule("r", u_mine, mode=IMMEDIATE)
    mine.mark_complete()
    assert w.is_complete("r")
    assert status_tuple(sched, "r")[:4] == (1, 1, 0, 0)


def test_second_mark_is_protocol_error_and_not_counted(sched):
    w = sched.worker
    w.create_slot("r")
    u, h = joined(sched, "r", LOAD)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
    raises_clean(sched, ProtocolError, h.mark_complete, rids=["r"], rid="r", u=u)
    raises_clean(sched, ProtocolError, h.mark_complete, error="late", rids=["r"], rid="r", u=u)
    u2, h2 = joined(sched, "r", LOAD)
    assert h2.wait(1) is EXECUTE
    h2.mark_complete(error=RuntimeError("x"))
    raises_clean(sched, ProtocolError, h2.mark_complete, rids=["r"], rid="r", u=u2)
    c = counters(sched)
    assert (c["completed"], c["failed"]) == (1, 1)
    assert status_tuple(sched, "r")[:4] == (2, 1, 1, 0)


def test_mark_undecided_or_cancelled_is_protocol_error(sched):
    w = sched.worker
    w.create_slot("r")
    u, h = joined(sched, "r", STORE, LayerComplete(0, 5))
    assert h.decision is None
    raises_clean(sched, ProtocolError, h.mark_complete, rids=["r"], rid="r", u=u)
    w.cancel_slot("r")
    assert h.wait(1) is CANCEL
    raises_clean(sched, ProtocolError, h.mark_complete, rids=["r"], rid="r", u=u)
    assert status_tuple(sched, "r")[:4] == (1, 0, 0, 1)


def test_with_block_marks_complete_or_failed(sched):
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", LOAD)
    assert h.wait(1) is EXECUTE
    with h:
        pass
    u2, h2 = joined(sched, "r", LOAD)
    assert h2.wait(1) is EXECUTE
    with pytest.raises(ValueError, match="bad copy"):
        with h2:
            raise ValueError("bad copy")
    st = w.slot_status("r")
    assert (st.completed, st.failed) == (1, 1)
    assert st.errors[0][0] == u2 and "bad copy" in st.errors[0][1]
    assert w.is_complete("r")


def test_dropped_delivered_handle_fails_the_op(make_scheduler, caplog):
    s = make_scheduler(max_inflight=1)
    w = s.worker
    w.create_slot("r")
    u, h = joined(s, "r", LOAD)
    _, nxt = joined(s, "r", LOAD)
    assert h.wait(1) is EXECUTE  # delivered
    assert nxt.decision is None
    with caplog.at_level(logging.WARNING):
        del h
        gc.collect()
        assert wait_until(lambda: w.slot_status("r").failed == 1, timeout=1.0)
    st = w.slot_status("r")
    assert st.errors[0][0] == u and "HandleDroppedError" in st.errors[0][1]
    c = counters(s)
    assert c["dropped"] == 1 and c["failed"] == 1
    assert nxt.wait(1) is EXECUTE  # the dropped op's token came back
    nxt.mark_complete()
    assert w.is_complete("r")
    assert any(r.name.startswith("kvsched") and "HandleDroppedError" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("decided_before_drop", [False, True])
def test_dropping_undelivered_handle_withdraws_nothing(sched, new_uuid, decided_before_drop):
    w, t = sched.worker, sched.transfer
    u = new_uuid()
    w.create_slot("r")
    h = t.schedule("r", u)
    if decided_before_drop:
        w.enqueue("r", u, LOAD)  # decided EXECUTE, but nobody has looked
    del h
    gc.collect()
    if not decided_before_drop:
        w.enqueue("r", u, LOAD)
    got = t.poll(timeout=1.0)
    assert [g.uuid for g in got] == [u]
    assert got[0].decision is EXECUTE
    got[0].mark_complete()
    assert w.is_complete("r")
    assert status_tuple(sched, "r")[:4] == (1, 1, 0, 0)
    assert counters(sched)["dropped"] == 0


def test_dropped_cancel_handle_is_not_a_failure(sched):
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", STORE, LayerComplete(0, 9))
    w.cancel_slot("r")
    assert h.wait(1) is CANCEL
    del h
    gc.collect()
    assert status_tuple(sched, "r")[:4] == (1, 0, 0, 1)
    assert counters(sched)["dropped"] == 0


def test_poll_returns_the_same_handle_objects_each_once(sched):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    hs = [joined(sched, "r", LOAD, transfer_first=bool(i % 2))[1] for i in range(5)]
    got = []
    while len(got) < 5:
        batch = t.poll(max_items=2, timeout=1.0)
        assert batch and len(batch) <= 2
        got += batch
    assert [id(g) for g in got] == [id(h) for h in hs]  # the same objects, oldest first
    assert t.poll() == []
    for h in hs:
        h.mark_complete()


def test_handle_delivered_by_wait_is_not_polled(sched):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    _, h1 = joined(sched, "r", LOAD)
    _, h2 = joined(sched, "r", LOAD)
    assert h1.wait(1) is EXECUTE
    got = t.poll(timeout=1.0)
    assert got == [h2]


def test_every_operation_ends_exactly_once(sched):
    w = sched.worker
    w.create_slot("r")
    ok = [joined(sched, "r", LOAD)[1] for _ in range(4)]
    bad = [joined(sched, "r", STORE)[1] for _ in range(3)]
    gated = [joined(sched, "r", STORE, LayerComplete(0, 9))[1] for _ in range(2)]
    for h in ok:
        assert h.wait(1) is EXECUTE
        h.mark_complete()
    for h in bad:
        assert h.wait(1) is EXECUTE
        h.mark_complete(error="e")
    w.cancel_slot("r")
    for h in gated:
        assert h.wait(1) is CANCEL
    st = w.slot_status("r")
    assert (st.expected, st.completed, st.failed, st.cancelled) == (9, 4, 3, 2)
    assert st.is_complete and w.is_complete("r")
    c = counters(sched)
    assert (c["completed"], c["failed"], c["cancelled"], c["executed"]) == (4, 3, 2, 7)
    assert (c["scheduled"], c["enqueued"], c["inflight"]) == (9, 9, 0)
