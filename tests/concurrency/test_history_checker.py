"""The linearizability checker of history.py can fail (STYLE.md B2: "oracles that can fail"):
hand-written histories, correct ones pass and broken ones are rejected."""

from __future__ import annotations

import uuid

import pytest

from history import E, C, Event, NotLinearizable, check_linearizable

pytestmark = pytest.mark.timeout(30)

U1, U2 = uuid.UUID(int=1), uuid.UUID(int=2)
ERR = lambda name: ("raise", name)  # noqa: E731


def ev(t0, t1, op, args=(), result=None, rid="r"):
    return Event(t0, t1, "t", None if op in ("close", "close_end") else rid, op, args, result)


def seq(*items):
    """Sequential events: each (op, args, result) at times 10, 20, 30..."""
    return [ev(10 * i, 10 * i + 5, *it) for i, it in enumerate(items, 1)]


GOOD = [
    ("create_slot", (), None),
    ("enqueue", (U1, "S"), None),
    ("is_complete", (), False),
    ("schedule", (U1, "S"), None),
    ("wait", (U1,), E),
    ("mark", (U1, "failed"), None),
    ("second_mark", (U1, "completed"), ERR("ProtocolError")),
    ("slot_status", (), (1, 0, 1, 0)),
    ("is_complete", (), True),
    ("remove_slot", (), None),
    ("is_complete", (), ERR("UnknownSlotError")),
]


def test_sequential_history_passes():
    assert check_linearizable(seq(*GOOD)) > 0


@pytest.mark.parametrize("index,bad", [
    (2, ("is_complete", (), True)),                          # not complete yet
    (4, ("wait", (U1,), C)),                                 # nobody cancelled it
    (6, ("second_mark", (U1, "completed"), None)),           # a second mark accepted
    (7, ("slot_status", (), (1, 1, 0, 0))),                  # counted as completed, not failed
    (9, ("remove_slot", (), ERR("SlotBusyError"))),          # it is complete
    (10, ("is_complete", (), False)),                        # the slot was removed
])
def test_tampered_history_fails(index, bad):
    items = list(GOOD)
    items[index] = bad
    with pytest.raises(NotLinearizable):
        check_linearizable(seq(*items))


def test_overlap_allows_either_order_but_not_a_stale_read():
    base = [ev(0, 5, "create_slot"), ev(10, 20, "enqueue", (U1, "S"))]
    # overlapping the enqueue: is_complete may be linearized before it (True) or after (False)
    for result in (True, False):
        assert check_linearizable(base + [ev(12, 18, "is_complete", (), result)])
    # after the enqueue returned it must be False: True is a stale read
    with pytest.raises(NotLinearizable):
        check_linearizable(base + [ev(25, 30, "is_complete", (), True)])


def test_cancel_races_the_decision_of_a_joined_operation():
    base = [ev(0, 1, "create_slot"), ev(2, 3, "enqueue", (U1, "S")),
            ev(4, 5, "schedule", (U1, "S")), ev(10, 11, "cancel_slot")]
    # joined before the cancel: it may have run (EXECUTE) or been cancelled
    assert check_linearizable(base + [ev(20, 20, "wait", (U1,), E)])
    assert check_linearizable(base + [ev(20, 20, "wait", (U1,), C)])
    # seen undecided after the cancel returned: impossible
    with pytest.raises(NotLinearizable):
        check_linearizable(base + [ev(20, 20, "wait", (U1,), None)])
    # the transfer half arrives only after the cancel: it can only be CANCEL
    late = [ev(0, 1, "create_slot"), ev(2, 3, "enqueue", (U1, "S")), ev(10, 11, "cancel_slot"),
            ev(12, 13, "schedule", (U1, "S"))]
    assert check_linearizable(late + [ev(20, 20, "wait", (U1,), C)])
    with pytest.raises(NotLinearizable):
        check_linearizable(late + [ev(20, 20, "wait", (U1,), E)])


def test_drop_fails_the_operation():
    base = [ev(0, 1, "create_slot"), ev(2, 3, "enqueue", (U1, "S")),
            ev(4, 5, "schedule", (U1, "S")), ev(6, 6, "wait", (U1,), E),
            ev(7, 8, "drop", (U1,))]
    assert check_linearizable(base + [ev(9, 10, "slot_status", (), (1, 0, 1, 0))])
    with pytest.raises(NotLinearizable):
        check_linearizable(base + [ev(9, 10, "slot_status", (), (1, 0, 0, 0))])
    # an open-ended drop (its effect may come later) accepts both
    open_drop = base[:-1] + [ev(7, float("inf"), "drop", (U1,))]
    assert check_linearizable(open_drop + [ev(9, 10, "slot_status", (), (1, 0, 0, 0))])


def test_close_is_not_atomic_but_ends_with_every_undecided_cancelled():
    base = [ev(0, 1, "create_slot"), ev(2, 3, "enqueue", (U1, "S")),
            ev(4, 5, "schedule", (U2, "S"), rid="r2"), ev(10, 20, "close"), ev(20, 20, "close_end")]
    # during close: still undecided, or already CANCEL
    assert check_linearizable(base + [ev(15, 15, "wait", (U2,), None, rid="r2")])
    assert check_linearizable(base + [ev(15, 15, "wait", (U2,), C, rid="r2")])
    # after close returned: undecided is impossible
    with pytest.raises(NotLinearizable):
        check_linearizable(base + [ev(25, 25, "wait", (U2,), None, rid="r2")])
    # after close every call but the handle's raises SchedulerClosedError
    assert check_linearizable(base + [ev(25, 26, "is_complete", (), ERR("SchedulerClosedError"))])
    with pytest.raises(NotLinearizable):
        check_linearizable(base + [ev(25, 26, "is_complete", (), False)])


def test_late_transfer_half_of_removed_slot_is_cancelled():
    h = [ev(0, 1, "create_slot"), ev(2, 3, "enqueue", (U1, "S")), ev(4, 5, "cancel_slot"),
         ev(6, 7, "remove_slot"), ev(8, 9, "schedule", (U1, "S"))]
    assert check_linearizable(h + [ev(10, 10, "wait", (U1,), C)])
    with pytest.raises(NotLinearizable):
        check_linearizable(h + [ev(10, 10, "wait", (U1,), E)])
