"""Helpers shared by the spec tests (imported as a plain module: pytest puts tests/spec on
sys.path). Only public API is used, so the helpers work for both implementations."""

from __future__ import annotations

import time
import uuid

import pytest

from kvsched.errors import UnknownSlotError
from kvsched.protocol import Decision, RequestMode, TransferKind

EXECUTE, CANCEL = Decision.EXECUTE, Decision.CANCEL
LOAD, STORE = TransferKind.LOAD, TransferKind.STORE
SCHEDULED, IMMEDIATE = RequestMode.SCHEDULED, RequestMode.IMMEDIATE

# The integer counters every implementation's stats() must have (the brief's contract).
COUNTERS = ("scheduled", "enqueued", "executed", "completed", "failed", "cancelled", "dropped",
            "timed_out", "inflight", "peak_inflight", "max_inflight", "removed_memory_size")


def counters(s):
    st = s.stats()
    return {k: st[k] for k in COUNTERS}


def status_tuple(s, rid):
    """Everything the worker can observe about one slot (None if it has no slot)."""
    w = s.worker
    try:
        st = w.slot_status(rid)
        return (st.expected, st.completed, st.failed, st.cancelled, list(st.errors),
                w.is_complete(rid))
    except UnknownSlotError:
        return None


def snapshot(s, rids=()):
    return {"stats": counters(s), **{rid: status_tuple(s, rid) for rid in rids}}


def check_message(err, rid=None, u=None):
    """S8: the message names the request id and the uuid (canonical string form)."""
    msg = str(err)
    if rid is not None:
        assert rid in msg, f"request id {rid!r} missing from message: {msg!r}"
    if u is not None:
        canon = str(uuid.UUID(str(u)) if not isinstance(u, uuid.UUID) else u)
        assert canon in msg, f"uuid {canon} missing from message: {msg!r}"


def raises_clean(s, cls, fn, *args, rids=(), rid=None, u=None, **kwargs):
    """Call fn(*args, **kwargs); it must raise cls, name rid and u in the message, and leave
    the scheduler as it was (slot_status, is_complete and stats counters of ``rids``)."""
    before = snapshot(s, rids)
    with pytest.raises(cls) as ei:
        fn(*args, **kwargs)
    check_message(ei.value, rid, u)
    assert snapshot(s, rids) == before, "a call that raised changed the scheduler"
    return ei.value


def wait_until(pred, timeout=2.0, step=0.005):
    end = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(step)


def joined(s, rid, kind=LOAD, requirement=None, mode=SCHEDULED, u=None, transfer_first=False):
    """Send both halves of one operation; returns (uuid, handle). The slot must exist."""
    u = u or uuid.uuid4()
    if transfer_first:
        h = s.transfer.schedule(rid, u, requirement=requirement, mode=mode)
        s.worker.enqueue(rid, u, kind, mode=mode)
    else:
        s.worker.enqueue(rid, u, kind, mode=mode)
        h = s.transfer.schedule(rid, u, requirement=requirement, mode=mode)
    return u, h


def decided_now(h):
    """The handle's decision after a short grace period (decisions at join may be made by
    another thread in an implementation); None if still undecided."""
    return h.wait(timeout=0.05)
