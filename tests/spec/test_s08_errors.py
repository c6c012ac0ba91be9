"""S8 errors are clean: misuse raises a KvschedError subclass naming the request id and uuid,
wrong types raise TypeError/ValueError at the boundary, and a call that raises changes nothing."""

import types
import uuid

import pytest

from kvsched.errors import (DuplicateOperationError, InvalidArgumentError, KvschedError,
                            ProtocolError, SlotExistsError, UnknownSlotError)
from kvsched.protocol import IterationComplete, LayerComplete, LayerNameComplete
from spec_helpers import EXECUTE, LOAD, STORE, counters, joined, raises_clean

pytestmark = pytest.mark.timeout(60)

U = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
RIDS = ["r", "other"]


@pytest.fixture
def env(make_scheduler):
    """A scheduler with some state, so 'nothing changed' means something."""
    s = make_scheduler(max_inflight=2, layer_names=["a", "b", "c"])
    w = s.worker
    w.create_slot("r")
    w.create_slot("other")
    _, h = joined(s, "r", LOAD)
    assert h.wait(1) is EXECUTE
    joined(s, "r", STORE, LayerComplete(1, 1))
    w.enqueue("other", uuid.uuid4(), LOAD)
    s.transfer.schedule("ghost", uuid.uuid4())
    return types.SimpleNamespace(s=s, executing=h)


@pytest.fixture
def s(env):
    return env.s


def test_error_classes_are_kvsched_errors():
    assert issubclass(InvalidArgumentError, KvschedError) and issubclass(InvalidArgumentError, ValueError)
    for cls in (SlotExistsError, UnknownSlotError, DuplicateOperationError, ProtocolError):
        assert issubclass(cls, KvschedError)


@pytest.mark.parametrize("bad", [123, None, 1.5, object(), ["r"], b"r"])
def test_rid_must_be_str(s, bad):
    w, t = s.worker, s.transfer
    for fn, args in [(w.create_slot, ()), (w.enqueue, (U, LOAD)), (w.is_complete, ()),
                     (w.slot_status, ()), (w.cancel_slot, ()), (w.remove_slot, ()),
                     (t.schedule, (U,))]:
        raises_clean(s, TypeError, fn, bad, *args, rids=RIDS)


@pytest.mark.parametrize("bad", [123, None, 1.5, object(), [1, 2], True])
def test_uuid_wrong_type(s, bad):
    raises_clean(s, TypeError, s.worker.enqueue, "r", bad, LOAD, rids=RIDS, rid="r")
    raises_clean(s, TypeError, s.transfer.schedule, "r", bad, rids=RIDS, rid="r")


@pytest.mark.parametrize("bad", ["not-a-uuid", "", "0f1e2d3c-4b5a-6978-8796", b"\x00" * 15,
                                 b"\x00" * 17, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fz"])
def test_malformed_uuid(s, bad):
    for fn, args in [(s.worker.enqueue, ("r", bad, LOAD)), (s.transfer.schedule, ("r", bad))]:
        e = raises_clean(s, InvalidArgumentError, fn, *args, rids=RIDS, rid="r")
        assert isinstance(e, ValueError) and isinstance(e, KvschedError)


@pytest.mark.parametrize("bad,exc", [("LOAD", TypeError), (None, TypeError), (1.0, TypeError),
                                     (2, ValueError), (-1, ValueError)])
def test_bad_kind(s, bad, exc):
    raises_clean(s, exc, s.worker.enqueue, "r", U, bad, rids=RIDS, rid="r", u=U)


def test_kind_as_int_value(s):
    s.worker.enqueue("r", U, 1)  # TransferKind or its int value
    h = s.transfer.schedule("r", U)
    assert h.wait(1) is EXECUTE


@pytest.mark.parametrize("bad,exc", [("SCHEDULED", TypeError), (5, ValueError), (None, TypeError)])
def test_bad_mode(s, bad, exc):
    raises_clean(s, exc, s.worker.enqueue, "r", U, LOAD, mode=bad, rids=RIDS, rid="r", u=U)
    raises_clean(s, exc, s.transfer.schedule, "r", U, mode=bad, rids=RIDS, rid="r", u=U)


@pytest.mark.parametrize("bad,exc", [
    ("layer 3", TypeError), (3, TypeError), ((1, 1), TypeError),
    (LayerComplete(-1, 1), InvalidArgumentError), (LayerComplete(0, -1), InvalidArgumentError),
    (IterationComplete(-2), InvalidArgumentError), (LayerComplete("1", 1), TypeError),
    (LayerNameComplete("nope", 1), InvalidArgumentError),
    (LayerNameComplete("a", -1), InvalidArgumentError)])
def test_bad_requirement(s, bad, exc):
    raises_clean(s, exc, s.transfer.schedule, "r", U, requirement=bad, rids=RIDS, rid="r", u=U)


def test_unknown_layer_name_without_names(sched):
    e = raises_clean(sched, InvalidArgumentError, sched.transfer.schedule, "r", U,
                     requirement=LayerNameComplete("a", 1), rid="r", u=U)
    assert isinstance(e, ValueError)


@pytest.mark.parametrize("bad,exc", [(-1, InvalidArgumentError), ("nope", InvalidArgumentError),
                                     (1.5, TypeError), (None, TypeError)])
def test_bad_layer_mark(s, bad, exc):
    s.worker.start_next_iteration()
    raises_clean(s, exc, s.worker.mark_layer_complete, bad, rids=RIDS)
    s.worker.mark_layer_complete(0)  # progress was not changed by the bad call


def test_bad_handle_arguments(s, env):
    h = env.executing
    raises_clean(s, TypeError, h.wait, "soon", rids=RIDS)
    raises_clean(s, TypeError, h.mark_complete, error=123, rids=RIDS)
    h.mark_complete()
    assert counters(s)["completed"] == 1


def test_bad_poll_arguments(s):
    raises_clean(s, TypeError, s.transfer.poll, max_items="3", rids=RIDS)
    raises_clean(s, TypeError, s.transfer.poll, timeout="3", rids=RIDS)


def test_messages_use_canonical_uuid(s):
    """Whatever form the caller used, the message carries str(uuid.UUID)."""
    u = uuid.uuid4()
    s.worker.enqueue("r", u.bytes, LOAD)
    raises_clean(s, DuplicateOperationError, s.worker.enqueue, "r", str(u).upper(), STORE,
                 rids=RIDS, rid="r", u=u)
    raises_clean(s, UnknownSlotError, s.worker.enqueue, "missing", u.bytes, LOAD,
                 rids=RIDS, rid="missing", u=u)
    raises_clean(s, ProtocolError, s.transfer.schedule, "other", u.hex, rids=RIDS, rid="other", u=u)


def test_still_works_after_errors(s):
    w, t = s.worker, s.transfer
    for fn, args in [(w.enqueue, ("r", "zzz", LOAD)), (w.create_slot, (1,)),
                     (t.schedule, ("r", U, "bad")), (w.mark_layer_complete, (0,))]:
        with pytest.raises((TypeError, ValueError, KvschedError)):
            fn(*args)
    u, h = joined(s, "other", LOAD, u=U)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
