"""Disagreements found by the differential state machine (test_state_machine.py), pinned as small
tests so each stays visible until it is settled. The machine steers around them (each place says
which test here pins it), so that it keeps exploring everything else.

Two kinds:

* ``bug``: one implementation breaks a sentence of SPEC.md or docs/semantics.md. The test runs on
  both implementations and is ``xfail(strict=True)`` on the one that breaks it.
* ``agree``: SPEC and docs/semantics.md leave the case open and the two implementations chose
  differently. The test asserts that they agree and is ``xfail(strict=True)`` until one of them
  changes (then it passes, the strict xfail fails, and the pin is removed).
"""

from __future__ import annotations

import uuid

import pytest

import kvsched
from kvsched import Decision, IterationComplete, LayerComplete, RequestMode, TransferKind
from kvsched.errors import DuplicateOperationError, ProtocolError
from kvsched.reference import ReferenceScheduler

pytestmark = pytest.mark.timeout(30)

LOAD = TransferKind.LOAD
SCHEDULED, IMMEDIATE = RequestMode.SCHEDULED, RequestMode.IMMEDIATE
EXECUTE, CANCEL = Decision.EXECUTE, Decision.CANCEL
CLASSES = {"core": kvsched.Scheduler, "reference": ReferenceScheduler}


def impls(core_xfail=None, reference_xfail=None):
    """Both implementations; the one named gets xfail(strict=True, reason=...)."""
    out = []
    for name, reason in (("core", core_xfail), ("reference", reference_xfail)):
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture
def make(request):
    made = []

    def factory(name, **kw):
        s = CLASSES[name](**kw)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.close()


def outcome_of(fn):
    """What a call did, comparable across implementations: ('ok', value) or ('raise', class)."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001
        return ("raise", type(e).__name__)


def peek(h):
    return repr(h).split("decision=")[1].split()[0]


def both(scenario, **kw):
    out = {}
    for name, cls in CLASSES.items():
        s = cls(**kw)
        try:
            out[name] = scenario(s)
        finally:
            s.close()
    return out


# ------------------------------------------------------------------------------- bugs

RECANCEL = ("core: create_slot(rid) erases rid from cancelled_rids_ but leaves its entry in "
            "cancelled_order_ (csrc/core/scheduler.cpp create_slot / cancel_slot), and that stale "
            "entry still counts against removed_memory. (a) Another cancelled rid is forgotten "
            "early: removed_memory=2, cancel r0, cancel r2, create r2, cancel r1 evicts r0 though "
            "only r0 and r1 are cancelled. (b) When the re-created rid is cancelled again it gets "
            "a second entry, and the eviction of the stale front entry erases the fresh "
            "cancellation. Either way a transfer half that arrives later for a cancelled rid "
            "waits (undecided) instead of being decided CANCEL at once (SPEC S6, docs/semantics.md "
            "'remembered as cancelled until create_slot').")


@pytest.mark.parametrize("impl", impls(core_xfail=RECANCEL))
@pytest.mark.parametrize("case", ["recancel-memory-1", "recancel-memory-2", "other-rid-memory-2"])
def test_cancelled_rid_memory_after_create(make, impl, case):
    """Found by the machine. The transfer half for the cancelled rid must be CANCEL at once."""
    s = make(impl, removed_memory=1 if case == "recancel-memory-1" else 2)
    w, t = s.worker, s.transfer
    if case == "other-rid-memory-2":
        w.cancel_slot("r0")
        w.cancel_slot("r2")
        w.create_slot("r2")
        w.cancel_slot("r1")
        target = "r0"
    else:
        w.cancel_slot("r")
        w.create_slot("r")
        if case == "recancel-memory-2":
            w.cancel_slot("other")
        w.cancel_slot("r")
        target = "r"
    h = t.schedule(target, uuid.uuid4())
    assert peek(h) == "CANCEL"
    assert h.wait(0) is CANCEL


HELD_CANCEL = ("core: a SCHEDULED transfer half for a rid cancelled before its slot exists becomes "
               "a standalone CANCEL op that is not kept in the join table "
               "(Scheduler::standalone_cancel). When create_slot(rid) and the worker half for that "
               "uuid come later, the worker half starts a new operation that waits for a transfer "
               "half that never comes: is_complete(rid) stays False for ever (SPEC S4 'every "
               "operation ends exactly once', S5/docs 'held outcomes ... matched by uuid'). "
               "Cross-channel reordering of dynamo scenario 36.")


@pytest.mark.parametrize("impl", impls(core_xfail=HELD_CANCEL))
def test_cancelled_rid_outcome_is_held(make, impl):
    """cancel_slot('r') before the slot exists; the leader's half is decided CANCEL; then the
    worker creates the slot and enqueues the same uuid: the slot must be complete (cancelled 1),
    not wait for ever."""
    s = make(impl)
    w, t = s.worker, s.transfer
    u = uuid.uuid4()
    w.cancel_slot("r")
    h = t.schedule("r", u)
    assert h.wait(0) is CANCEL
    w.create_slot("r")
    w.enqueue("r", u, LOAD)
    st = w.slot_status("r")
    assert (st.expected, st.cancelled) == (1, 1)
    assert w.is_complete("r")


DUP_AFTER_CANCEL = ("core: the same uuid's transfer half twice, for a rid cancelled before its "
                    "slot exists, is decided CANCEL twice instead of raising "
                    "DuplicateOperationError the second time (SPEC S1 'the same uuid twice on "
                    "one side raises DuplicateOperationError'); the first CANCEL op is not "
                    "registered (Scheduler::standalone_cancel)")


@pytest.mark.parametrize("impl", impls(core_xfail=DUP_AFTER_CANCEL))
def test_duplicate_transfer_half_for_cancelled_rid(make, impl):
    s = make(impl)
    w, t = s.worker, s.transfer
    u = uuid.uuid4()
    w.cancel_slot("r")
    assert t.schedule("r", u).wait(0) is CANCEL
    with pytest.raises(DuplicateOperationError):
        t.schedule("r", u)


POLL_ENDED = ("core: mark_complete() on a handle whose EXECUTE decision was never read does not "
              "count as delivery, so a later transfer.poll() returns the handle of an operation "
              "that has already ended (outcome 'completed'); an executor polling for work would "
              "start the copy again (its mark then raises ProtocolError). The reference takes "
              "the handle out of the poll queue when it is marked.")


@pytest.mark.parametrize("impl", impls(core_xfail=POLL_ENDED))
def test_marked_handle_is_not_polled(make, impl):
    s = make(impl)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = uuid.uuid4()
    h = t.schedule("r", u)   # transfer half first: the handle exists before the decision
    w.enqueue("r", u, LOAD)  # joins: EXECUTE, not yet delivered
    assert peek(h) == "EXECUTE"
    h.mark_complete()
    assert w.is_complete("r")
    assert t.poll(max_items=8, timeout=0) == []


class Boom(Exception):
    pass


WITH_RAISE = ("core: Handle.__exit__ calls mark_complete(exc) on an undecided (or already marked) "
              "handle, which raises ProtocolError from __exit__ and replaces the body's exception; "
              "docs/semantics.md: '`with h:` marks complete, or failed if the body raised (the "
              "exception propagates)'. The reference lets the body's exception through.")


@pytest.mark.parametrize("impl", impls(core_xfail=WITH_RAISE))
@pytest.mark.parametrize("state", ["undecided", "marked"])
def test_with_body_exception_propagates(make, impl, state):
    s = make(impl)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = uuid.uuid4()
    if state == "marked":
        w.enqueue("r", u, LOAD)
    h = t.schedule("r", u)
    if state == "marked":
        assert h.wait(1) is EXECUTE
        h.mark_complete()
    with pytest.raises(Boom):
        with h:
            raise Boom("the copy failed")


# ------------------------------------------------------------------------------- disagreements

def _enqueue_removed(s):
    w = s.worker
    u = uuid.uuid5(uuid.NAMESPACE_URL, "removed")
    w.create_slot("r")
    w.enqueue("r", u, LOAD)
    w.cancel_slot("r")
    w.remove_slot("r")
    w.create_slot("r2")
    return outcome_of(lambda: w.enqueue("r2", u, LOAD))


@pytest.mark.xfail(strict=True, reason=(
    "disagree: a worker half whose uuid belonged to a removed slot (still in removed_memory): "
    "core raises DuplicateOperationError ('uuid belongs to an operation of a removed slot', the "
    "SPEC S1 reading), the reference accepts it as a new operation of the new slot. docs/"
    "semantics.md only says what a late *transfer* half does."))
def test_agree_worker_half_reusing_removed_uuid():
    got = both(_enqueue_removed)
    assert got["core"] == got["reference"], got


def _immediate_removed(s):
    w, t = s.worker, s.transfer
    u = uuid.uuid5(uuid.NAMESPACE_URL, "removed-imm")
    w.create_slot("r")
    w.enqueue("r", u, LOAD)
    h = t.schedule("r", u)
    h.wait(1)
    h.mark_complete()
    w.remove_slot("r")
    res = outcome_of(lambda: peek(t.schedule("r", u, mode=IMMEDIATE)))
    return res


@pytest.mark.xfail(strict=True, reason=(
    "disagree: an IMMEDIATE transfer half for a uuid of a removed slot: core raises "
    "DuplicateOperationError, the reference returns a detached handle decided EXECUTE whose "
    "outcome is credited nowhere. SPEC S6 says late halves are decided CANCEL, S5 that IMMEDIATE "
    "handles are EXECUTE at birth: the case is open."))
def test_agree_immediate_half_for_removed_uuid():
    got = both(_immediate_removed)
    assert got["core"] == got["reference"], got


@pytest.mark.xfail(strict=True, reason=(
    "disagree: LayerComplete(layer >= num_layers, i) (num_layers set by layer_names): core "
    "raises InvalidArgumentError at schedule(); the reference accepts it (it then holds only "
    "once iteration i is marked complete or a later one starts). docs/semantics.md: 'a layer "
    "index >= num_layers is out of range (ProtocolError)'; neither raises ProtocolError."))
def test_agree_requirement_layer_beyond_num_layers():
    got = both(lambda s: outcome_of(lambda: peek(s.transfer.schedule(
        "r", uuid.uuid4(), requirement=LayerComplete(5, 1)))), layer_names=["a", "b"])
    assert got["core"] == got["reference"], got


@pytest.mark.xfail(strict=True, reason=(
    "disagree: iterations >= 2**40 in a requirement: core raises InvalidArgumentError "
    "(kMaxIteration = 2**40 - 1, csrc/core/types.hpp), the reference accepts up to 2**63 - 1; "
    "the limit is documented nowhere."))
def test_agree_iteration_limit():
    got = both(lambda s: outcome_of(lambda: peek(s.transfer.schedule(
        "r", uuid.uuid4(), requirement=IterationComplete(2**41)))))
    assert got["core"] == got["reference"], got


@pytest.mark.xfail(strict=True, reason=(
    "disagree: docs/semantics.md says 'Layer indexes are < 2**24 - 1 always', so 2**24 - 2 is a "
    "valid layer; core rejects it (kMaxLayer = 2**24 - 3, csrc/core/types.hpp) with "
    "InvalidArgumentError, the reference accepts it."))
def test_agree_largest_layer_index():
    got = both(lambda s: outcome_of(lambda: peek(s.transfer.schedule(
        "r", uuid.uuid4(), requirement=LayerComplete(2**24 - 2, 1)))))
    assert got["core"] == got["reference"], got


@pytest.mark.xfail(strict=True, reason=(
    "disagree: with h: on a handle decided CANCEL and a body that does not raise: core returns "
    "silently (Handle.__exit__ skips CANCEL), the reference raises ProtocolError (docs/"
    "semantics.md: 'Marking a CANCEL or undecided handle raises ProtocolError')."))
def test_agree_with_on_cancelled_handle():
    def scenario(s):
        s.worker.cancel_slot("r")
        h = s.transfer.schedule("r", uuid.uuid4())
        assert h.wait(0) is CANCEL

        def body():
            with h:
                pass
        return outcome_of(body)
    got = both(scenario)
    assert got["core"] == got["reference"], got


@pytest.mark.xfail(strict=True, reason=(
    "disagree: which cancelled rid the bounded memory (removed_memory) forgets after a rid is "
    "cancelled twice: the reference refreshes a re-cancelled rid (LRU: evicts the other one), the "
    "core keeps its first position (FIFO: evicts the re-cancelled one, cancel_slot only pushes "
    "when the rid is new). With removed_memory=2: cancel r0, cancel r2, cancel r0, cancel r1; a "
    "transfer half for r0 is CANCEL in the reference and waits in the core."))
def test_agree_recancel_eviction():
    def scenario(s):
        for rid in ("r0", "r2", "r0", "r1"):
            s.worker.cancel_slot(rid)
        return peek(s.transfer.schedule("r0", uuid.uuid4()))
    got = both(scenario, removed_memory=2)
    assert got["core"] == got["reference"], got


@pytest.mark.parametrize("call", [
    "poll(max_items=0)", "poll(timeout=-1)", "wait(timeout=-1)", "wait(timeout=nan)"])
@pytest.mark.xfail(strict=True, reason=(
    "disagree: boundary values of poll/wait: core returns [] for poll(max_items=0), treats a "
    "negative timeout as 0 and raises InvalidArgumentError (a ValueError) for NaN; the reference "
    "raises a plain ValueError for all four. SPEC S8: 'values out of range raise ValueError'."))
def test_agree_poll_and_wait_bounds(call):
    def scenario(s):
        h = s.transfer.schedule("r", uuid.uuid4())
        fn = {"poll(max_items=0)": lambda: s.transfer.poll(max_items=0),
              "poll(timeout=-1)": lambda: s.transfer.poll(timeout=-1),
              "wait(timeout=-1)": lambda: h.wait(timeout=-1),
              "wait(timeout=nan)": lambda: h.wait(timeout=float("nan"))}[call]
        return outcome_of(fn)
    got = both(scenario)
    assert got["core"] == got["reference"], got


# ------------------------------------------------------------------------------- agreements
# Neighbours of the pins above on which the two already agree (so a fix of one pin that breaks
# its neighbour shows up here).

@pytest.mark.parametrize("impl", impls())
def test_late_scheduled_half_of_removed_slot_is_cancelled(make, impl):
    s = make(impl)
    w, t = s.worker, s.transfer
    u = uuid.uuid4()
    w.create_slot("r")
    w.enqueue("r", u, LOAD)
    w.cancel_slot("r")
    w.remove_slot("r")
    assert t.schedule("r", u).wait(0) is CANCEL
    assert t.schedule("r", u).wait(0) is CANCEL  # again: still remembered


@pytest.mark.parametrize("impl", impls())
def test_with_on_executing_handle(make, impl):
    s = make(impl)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u1, u2 = uuid.uuid4(), uuid.uuid4()
    for u in (u1, u2):
        w.enqueue("r", u, LOAD)
    h1, h2 = t.schedule("r", u1), t.schedule("r", u2)
    assert h1.wait(1) is EXECUTE and h2.wait(1) is EXECUTE
    with h1:
        pass
    with pytest.raises(Boom):
        with h2:
            raise Boom("E")
    st = w.slot_status("r")
    assert (st.completed, st.failed) == (1, 1)
    assert st.errors[0][0] == u2 and "Boom" in st.errors[0][1]
    with pytest.raises(ProtocolError):
        with h1:
            pass
