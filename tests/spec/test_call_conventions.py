"""The per-operation calls take their arguments as Python functions do (positionally or by name,
defaults as in contract section 3, docs/contract.md), and argument misuse is a TypeError that
changes nothing. In the core these calls bypass pybind11's dispatcher
(csrc/bindings/fast_methods.hpp), so their argument handling is our own code: held here to the
reference model's plain Python signatures."""

import inspect
import uuid

import pytest

from kvsched.protocol import Decision, LayerComplete, RequestMode, TransferKind
from spec_helpers import counters

pytestmark = pytest.mark.timeout(30)

LOAD = TransferKind.LOAD


def test_keywords_and_defaults(make_scheduler):
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot(rid="r")
    u1, u2 = uuid.uuid4(), uuid.uuid4()
    w.enqueue(rid="r", uuid=u1, kind=LOAD)  # mode defaults to SCHEDULED
    w.enqueue("r", u2, kind=LOAD, mode=RequestMode.SCHEDULED)
    h1 = t.schedule(uuid=u1, rid="r")
    h2 = t.schedule("r", u2, requirement=None, mode=RequestMode.SCHEDULED)
    assert h1.decision is Decision.EXECUTE and h2.wait(1) is Decision.EXECUTE
    h1.mark_complete()
    h2.mark_complete(error="copy failed")
    st = w.slot_status("r")
    assert (st.completed, st.failed) == (1, 1)
    w.remove_slot(rid="r")


@pytest.mark.parametrize("call", [
    "enqueue()", "enqueue(rid)", "enqueue(rid, uuid)", "enqueue 5 args", "enqueue bogus kw",
    "enqueue rid twice", "schedule()", "schedule(rid)", "schedule 5 args", "schedule bogus kw",
    "schedule uuid twice", "create_slot()", "create_slot 2 args", "create_slot bogus kw",
    "remove_slot()", "mark_complete 2 args", "mark_complete bogus kw",
])
def test_argument_misuse_is_a_type_error_and_changes_nothing(make_scheduler, call):
    s = make_scheduler(max_inflight=1)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = uuid.uuid4()
    w.enqueue("r", u, LOAD)
    h = t.schedule("r", u, requirement=LayerComplete(0, 1))
    before = counters(s), w.slot_status("r")
    v = uuid.uuid4()
    fn = {
        "enqueue()": lambda: w.enqueue(),
        "enqueue(rid)": lambda: w.enqueue("r"),
        "enqueue(rid, uuid)": lambda: w.enqueue("r", v),
        "enqueue 5 args": lambda: w.enqueue("r", v, LOAD, 0, 0),
        "enqueue bogus kw": lambda: w.enqueue("r", v, LOAD, priority=1),
        "enqueue rid twice": lambda: w.enqueue("r", v, LOAD, rid="r"),
        "schedule()": lambda: t.schedule(),
        "schedule(rid)": lambda: t.schedule("r"),
        "schedule 5 args": lambda: t.schedule("r", v, None, 0, 0),
        "schedule bogus kw": lambda: t.schedule("r", v, deadline=1),
        "schedule uuid twice": lambda: t.schedule("r", v, uuid=v),
        "create_slot()": lambda: w.create_slot(),
        "create_slot 2 args": lambda: w.create_slot("x", "y"),
        "create_slot bogus kw": lambda: w.create_slot(request="x"),
        "remove_slot()": lambda: w.remove_slot(),
        "mark_complete 2 args": lambda: h.mark_complete(None, None),
        "mark_complete bogus kw": lambda: h.mark_complete(err="x"),
    }[call]
    with pytest.raises(TypeError):
        fn()
    assert (counters(s), w.slot_status("r")) == before
    assert h.decision is None  # still gated, untouched


def test_methods_refuse_another_object_as_self(make_scheduler):
    if make_scheduler.impl == "reference":
        pytest.skip("the reference's methods are plain Python functions: self is duck-typed")
    s = make_scheduler()
    with pytest.raises(TypeError):
        type(s.worker).enqueue(s.transfer, "r", uuid.uuid4(), LOAD)


def test_signatures_name_the_parameters(make_scheduler):
    s = make_scheduler()
    assert list(inspect.signature(s.worker.enqueue).parameters)[:4] == ["rid", "uuid", "kind", "mode"]
    assert list(inspect.signature(s.transfer.schedule).parameters)[:4] == [
        "rid", "uuid", "requirement", "mode"]
