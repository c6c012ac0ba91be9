"""S6 cancel and remove: cancel_slot decides undecided operations CANCEL, executing ones run to
their end, late halves are cancelled at once (also after remove_slot, within a bounded
memory); remove_slot needs a complete slot; a reused rid starts clean."""

import pytest

from kvsched.errors import SlotBusyError, SlotExistsError, UnknownSlotError
from kvsched.protocol import LayerComplete
from spec_helpers import (CANCEL, EXECUTE, LOAD, STORE, counters, joined, raises_clean,
                          status_tuple)

pytestmark = pytest.mark.timeout(60)


def test_cancel_with_executing_undecided_and_late_halves(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    _, h_exec = joined(sched, "r", LOAD)                          # executing
    _, h_gated = joined(sched, "r", STORE, LayerComplete(0, 3))   # undecided: gated
    u_w_only = new_uuid()
    w.enqueue("r", u_w_only, STORE)                               # undecided: no transfer half
    u_t_only = new_uuid()
    h_t_only = t.schedule("r", u_t_only)                          # undecided: no worker half
    assert h_exec.wait(1) is EXECUTE
    assert h_gated.decision is None and h_t_only.decision is None

    w.cancel_slot("r")
    assert h_gated.wait(1) is CANCEL
    assert h_t_only.wait(1) is CANCEL
    assert h_exec.decision is EXECUTE            # a DMA cannot be recalled
    assert not w.is_complete("r")                # so the blocks are not reusable yet
    assert status_tuple(sched, "r")[:4] == (3, 0, 0, 2)

    late_t = t.schedule("r", u_w_only)           # late transfer half: CANCEL at once
    assert late_t.wait(0) is CANCEL
    w.enqueue("r", u_t_only, LOAD)               # late worker half of a cancelled op
    u_late = new_uuid()
    w.enqueue("r", u_late, LOAD)                 # a new worker half in the cancelled slot
    assert t.schedule("r", u_late).wait(0) is CANCEL
    assert status_tuple(sched, "r")[:4] == (5, 0, 0, 4)
    assert not w.is_complete("r")

    h_exec.mark_complete()
    assert w.is_complete("r")
    assert status_tuple(sched, "r")[:4] == (5, 1, 0, 4)
    assert w.take_finished() == ["r"]
    c = counters(sched)
    assert (c["completed"], c["cancelled"], c["inflight"]) == (1, 4, 0)


def test_cancel_is_idempotent(sched):
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", STORE, LayerComplete(0, 3))
    w.cancel_slot("r")
    w.cancel_slot("r")
    assert h.wait(1) is CANCEL
    assert status_tuple(sched, "r")[:4] == (1, 0, 0, 1)
    assert counters(sched)["cancelled"] == 1


def test_cancel_without_slot_cancels_waiting_transfer_halves(sched, new_uuid):
    w, t = sched.worker, sched.transfer
    u1 = new_uuid()
    h1 = t.schedule("r", u1)
    h_other = t.schedule("other", new_uuid())
    w.cancel_slot("r")  # no slot: not an error
    assert h1.wait(1) is CANCEL
    assert h_other.decision is None
    assert t.schedule("r", new_uuid()).wait(0) is CANCEL  # remembered as cancelled
    # create_slot starts the rid afresh: new halves wait and execute again
    w.create_slot("r")
    u2 = new_uuid()
    h2 = t.schedule("r", u2)
    assert h2.decision is None
    w.enqueue("r", u2, LOAD)
    assert h2.wait(1) is EXECUTE


def test_remove_busy_slot_changes_nothing(sched):
    w = sched.worker
    w.create_slot("r")
    u, h = joined(sched, "r", LOAD)
    assert h.wait(1) is EXECUTE
    raises_clean(sched, SlotBusyError, w.remove_slot, "r", rids=["r"], rid="r")
    w.cancel_slot("r")  # executing op still runs: still busy
    raises_clean(sched, SlotBusyError, w.remove_slot, "r", rids=["r"], rid="r")
    h.mark_complete()
    w.remove_slot("r")
    raises_clean(sched, UnknownSlotError, w.slot_status, "r", rid="r")
    raises_clean(sched, UnknownSlotError, w.remove_slot, "r", rid="r")


def test_create_existing_slot(sched):
    w = sched.worker
    w.create_slot("r")
    joined(sched, "r", LOAD)
    raises_clean(sched, SlotExistsError, w.create_slot, "r", rids=["r"], rid="r")


@pytest.mark.parametrize("how", ["completed", "cancelled_w_only"])
def test_late_transfer_half_after_remove_is_cancelled(sched, new_uuid, how):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, LOAD)
    if how == "completed":
        h = t.schedule("r", u)
        assert h.wait(1) is EXECUTE
        h.mark_complete()
        # (while the slot exists, a second transfer half would be DuplicateOperationError)
    else:
        w.cancel_slot("r")  # cancelled before its transfer half ever came
    w.remove_slot("r")
    late = t.schedule("r", u)  # after removal it is decided CANCEL at once
    assert late.wait(0) is CANCEL
    w.create_slot("r")  # also once the rid is reused
    assert status_tuple(sched, "r") == (0, 0, 0, 0, [], True)


def test_rid_reuse_starts_clean(sched, new_uuid):
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", LOAD)
    assert h.wait(1) is EXECUTE
    h.mark_complete(error="old failure")
    w.cancel_slot("r")
    w.remove_slot("r")
    w.create_slot("r")
    assert status_tuple(sched, "r") == (0, 0, 0, 0, [], True)
    assert w.take_finished() == []
    # the new slot is not cancelled: its operations run
    _, h2 = joined(sched, "r", LOAD)
    assert h2.wait(1) is EXECUTE
    h2.mark_complete()
    assert status_tuple(sched, "r") == (1, 1, 0, 0, [], True)
    assert w.take_finished() == ["r"]


@pytest.mark.parametrize("when", ["before_remove", "between_remove_and_create"])
def test_waiting_transfer_half_joins_the_next_slot(sched, new_uuid, when):
    """Prefill after onboarding reuses the rid: a transfer half waiting for its worker half
    survives remove_slot and joins the next slot of the same rid."""
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    _, h_old = joined(sched, "r", LOAD)
    assert h_old.wait(1) is EXECUTE
    h_old.mark_complete()
    u = new_uuid()
    if when == "before_remove":
        h = t.schedule("r", u)
    w.remove_slot("r")
    if when != "before_remove":
        h = t.schedule("r", u)
    assert h.decision is None
    w.create_slot("r")
    w.enqueue("r", u, STORE)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
    assert status_tuple(sched, "r")[:4] == (1, 1, 0, 0)


def test_removed_memory_is_bounded(make_scheduler, new_uuid):
    s = make_scheduler(removed_memory=2)
    w, t = s.worker, s.transfer
    us = []
    for i in range(3):
        w.create_slot(f"r{i}")
        u, h = joined(s, f"r{i}", LOAD)
        assert h.wait(1) is EXECUTE
        h.mark_complete()
        w.remove_slot(f"r{i}")
        us.append(u)
    st = s.stats()
    assert st["removed_memory_size"] == 2
    assert st["removed_forgotten"] == 1
    assert t.schedule("r2", us[2]).wait(0) is CANCEL  # remembered
    assert t.schedule("r1", us[1]).wait(0) is CANCEL
    forgotten = t.schedule("r0", us[0])               # the oldest was forgotten: it just waits
    assert forgotten.decision is None


def test_many_removals_stay_within_memory_bound(make_scheduler):
    s = make_scheduler(removed_memory=16)
    w = s.worker
    for i in range(200):
        w.create_slot("r")
        _, h = joined(s, "r", LOAD)
        assert h.wait(1) is EXECUTE
        h.mark_complete()
        w.remove_slot("r")
        assert s.stats()["removed_memory_size"] <= 16
    assert s.stats()["removed_memory_size"] == 16
