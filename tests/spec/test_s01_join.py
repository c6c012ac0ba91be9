"""S1 join: a SCHEDULED operation is decided only after both halves arrived, in either order;
duplicates on one side raise DuplicateOperationError; halves that disagree raise ProtocolError."""

import pytest

from kvsched.errors import DuplicateOperationError, KvschedError, ProtocolError
from spec_helpers import (EXECUTE, IMMEDIATE, LOAD, SCHEDULED, STORE, counters, joined,
                          raises_clean, status_tuple)

pytestmark = pytest.mark.timeout(60)


def test_worker_half_first(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    u = new_uuid()
    w.create_slot("r")
    w.enqueue("r", u, LOAD)
    assert not w.is_complete("r")
    assert w.slot_status("r").expected == 1
    assert t.poll() == []  # nothing is decided with one half
    h = t.schedule("r", u)
    assert h.wait(1) is EXECUTE
    assert h.request_id == "r" and h.uuid == u
    h.mark_complete()
    assert w.is_complete("r")


def test_transfer_half_first_before_slot_exists(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    u = new_uuid()
    h = t.schedule("r", u)  # no slot yet: the half waits
    assert h.decision is None
    assert h.wait(0.05) is None
    assert t.poll() == []
    w.create_slot("r")
    assert h.decision is None  # the slot alone is not the worker half
    w.enqueue("r", u, STORE)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
    assert w.is_complete("r")
    assert w.slot_status("r").completed == 1


def test_transfer_half_first_slot_exists(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    h = t.schedule("r", u)
    assert h.decision is None
    assert w.is_complete("r")  # the worker has not enqueued it: nothing expected yet
    w.enqueue("r", u, LOAD)
    assert not w.is_complete("r")
    assert h.wait(1) is EXECUTE


@pytest.mark.parametrize("form", ["uuid", "str", "upper", "bytes"])
def test_uuid_forms_join(sched, new_uuid, form):
    """uuid.UUID, its string (any case) and its 16 bytes name the same operation."""
    u = new_uuid()
    other = {"uuid": u, "str": str(u), "upper": str(u).upper(), "bytes": u.bytes}[form]
    sched.worker.create_slot("r")
    sched.worker.enqueue("r", other, LOAD)
    h = sched.transfer.schedule("r", u.bytes if form != "bytes" else str(u))
    assert h.wait(1) is EXECUTE
    assert h.uuid == u and isinstance(h.uuid, type(u))


def test_many_ops_one_slot_each_order(sched, new_uuid):
    w = sched.worker
    w.create_slot("r")
    hs = [joined(sched, "r", transfer_first=bool(i % 2))[1] for i in range(10)]
    assert all(h.wait(1) is EXECUTE for h in hs)
    for i, h in enumerate(hs):
        assert not w.is_complete("r")
        h.mark_complete()
    assert w.is_complete("r")
    st = w.slot_status("r")
    assert (st.expected, st.completed) == (10, 10)


@pytest.mark.parametrize("stage", ["pending", "joined", "ended"])
def test_duplicate_worker_half(sched, new_uuid, stage):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, LOAD)
    h = None
    if stage != "pending":
        h = t.schedule("r", u)
        assert h.wait(1) is EXECUTE
    if stage == "ended":
        h.mark_complete()
    e = raises_clean(sched, DuplicateOperationError, w.enqueue, "r", u, STORE,
                     rids=["r"], rid="r", u=u)
    assert isinstance(e, KvschedError)
    # the original operation is untouched
    if stage == "pending":
        h = t.schedule("r", u)
        assert h.wait(1) is EXECUTE
    if stage != "ended":
        h.mark_complete()
    assert w.slot_status("r").expected == 1
    assert w.is_complete("r")


def test_duplicate_worker_half_other_slot(sched, new_uuid):
    """The uuid alone keys an operation: enqueuing it into a second slot is a duplicate."""
    w = sched.worker
    w.create_slot("a")
    w.create_slot("b")
    u = new_uuid()
    w.enqueue("a", u, LOAD)
    raises_clean(sched, DuplicateOperationError, w.enqueue, "b", u, LOAD,
                 rids=["a", "b"], rid="b", u=u)


@pytest.mark.parametrize("stage", ["pending", "joined", "ended"])
def test_duplicate_transfer_half(sched, new_uuid, stage):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    h = t.schedule("r", u)
    if stage != "pending":
        w.enqueue("r", u, LOAD)
        assert h.wait(1) is EXECUTE
    if stage == "ended":
        h.mark_complete()
    raises_clean(sched, DuplicateOperationError, t.schedule, "r", str(u).upper(),
                 rids=["r"], rid="r", u=u)
    if stage == "pending":
        assert h.decision is None
        w.enqueue("r", u, LOAD)
        assert h.wait(1) is EXECUTE
    if stage != "ended":
        h.mark_complete()
    assert w.is_complete("r")
    assert counters(sched)["scheduled"] == 1


def test_duplicate_immediate_transfer_half(sched, new_uuid):
    u = new_uuid()
    h = sched.transfer.schedule("r", u, mode=IMMEDIATE)
    assert h.decision is EXECUTE
    raises_clean(sched, DuplicateOperationError, sched.transfer.schedule, "r", u, mode=IMMEDIATE,
                 rid="r", u=u)


@pytest.mark.parametrize("worker_mode,transfer_mode", [(SCHEDULED, IMMEDIATE), (IMMEDIATE, SCHEDULED)])
@pytest.mark.parametrize("transfer_first", [False, True])
def test_halves_disagree_on_mode(sched, new_uuid, worker_mode, transfer_mode, transfer_first):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    if transfer_first:
        h = t.schedule("r", u, mode=transfer_mode)
        raises_clean(sched, ProtocolError, w.enqueue, "r", u, LOAD, mode=worker_mode,
                     rids=["r"], rid="r", u=u)
        assert w.slot_status("r").expected == 0
        # the half that was there still joins a matching partner
        w.enqueue("r", u, LOAD, mode=transfer_mode)
    else:
        w.enqueue("r", u, LOAD, mode=worker_mode)
        raises_clean(sched, ProtocolError, t.schedule, "r", u, mode=transfer_mode,
                     rids=["r"], rid="r", u=u)
        h = t.schedule("r", u, mode=worker_mode)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
    assert w.is_complete("r")


@pytest.mark.parametrize("transfer_first", [False, True])
def test_halves_disagree_on_request_id(sched, new_uuid, transfer_first):
    w, t = sched.worker, sched.transfer
    w.create_slot("a")
    w.create_slot("b")
    u = new_uuid()
    if transfer_first:
        h = t.schedule("b", u)
        raises_clean(sched, ProtocolError, w.enqueue, "a", u, LOAD, rids=["a", "b"], rid="a", u=u)
        assert h.decision is None
    else:
        w.enqueue("a", u, LOAD)
        raises_clean(sched, ProtocolError, t.schedule, "b", u, rids=["a", "b"], rid="b", u=u)
        h = t.schedule("a", u)
        assert h.wait(1) is EXECUTE
    assert status_tuple(sched, "b")[:4] == (0, 0, 0, 0)
