"""S7 progress is monotonic: each layer mark is exactly the next index of the current
iteration; repeated, skipped, out-of-range marks and marks outside an iteration raise
ProtocolError and change nothing."""

import pytest

from kvsched.errors import KvschedError, ProtocolError
from kvsched.protocol import IterationComplete, LayerComplete
from spec_helpers import EXECUTE, STORE, joined, raises_clean

pytestmark = pytest.mark.timeout(60)


def gated(s, k, i):
    s.worker.create_slot(f"g{k}.{i}")
    return joined(s, f"g{k}.{i}", STORE, LayerComplete(k, i))[1]


def test_mark_before_first_iteration(sched):
    w = sched.worker
    raises_clean(sched, ProtocolError, w.mark_layer_complete, 0)
    raises_clean(sched, ProtocolError, w.mark_iteration_complete)
    assert w.start_next_iteration() == 1
    w.mark_layer_complete(0)


def test_skipped_and_repeated_layers(sched):
    w = sched.worker
    h1 = gated(sched, 1, 1)
    w.start_next_iteration()
    raises_clean(sched, ProtocolError, w.mark_layer_complete, 1)   # skips 0
    assert h1.decision is None  # the failed mark satisfied nothing
    w.mark_layer_complete(0)
    raises_clean(sched, ProtocolError, w.mark_layer_complete, 0)   # repeated
    raises_clean(sched, ProtocolError, w.mark_layer_complete, 2)   # skips 1
    assert h1.decision is None
    w.mark_layer_complete(1)
    assert h1.wait(1) is EXECUTE


def test_out_of_range_layer(make_scheduler):
    s = make_scheduler(num_layers=3)
    w = s.worker
    h = gated(s, 0, 2)
    w.start_next_iteration()
    for k in range(3):
        w.mark_layer_complete(k)
    e = raises_clean(s, ProtocolError, w.mark_layer_complete, 3)
    assert isinstance(e, KvschedError)
    assert h.decision is None
    w.start_next_iteration()
    w.mark_layer_complete(0)
    assert h.wait(1) is EXECUTE


def test_out_of_range_with_layer_names(make_scheduler):
    s = make_scheduler(layer_names=["a", "b"])
    w = s.worker
    w.start_next_iteration()
    w.mark_layer_complete("a")
    w.mark_layer_complete("b")
    raises_clean(s, ProtocolError, w.mark_layer_complete, 2)


def test_names_must_come_in_order(make_scheduler):
    s = make_scheduler(layer_names=["a", "b", "c"])
    w = s.worker
    w.start_next_iteration()
    raises_clean(s, ProtocolError, w.mark_layer_complete, "b")
    w.mark_layer_complete("a")
    raises_clean(s, ProtocolError, w.mark_layer_complete, "a")
    w.mark_layer_complete("b")


def test_no_layer_marks_after_iteration_complete(sched):
    """Once the iteration is marked complete, the worker is outside an iteration until the next
    starts. (Decision: a second mark_iteration_complete is also ProtocolError.)"""
    w = sched.worker
    w.start_next_iteration()
    w.mark_layer_complete(0)
    w.mark_iteration_complete()
    raises_clean(sched, ProtocolError, w.mark_layer_complete, 1)
    raises_clean(sched, ProtocolError, w.mark_iteration_complete)
    assert w.start_next_iteration() == 2
    w.mark_layer_complete(0)  # a new iteration starts at layer 0


def test_each_iteration_restarts_at_layer_zero(sched):
    w = sched.worker
    for it in range(1, 4):
        assert w.start_next_iteration() == it
        raises_clean(sched, ProtocolError, w.mark_layer_complete, 1)
        for k in range(it + 1):  # later iterations may stop early (the next starts anyway)
            w.mark_layer_complete(k)


def test_failed_marks_do_not_satisfy_iteration(sched):
    w = sched.worker
    sched.worker.create_slot("r")
    _, h = joined(sched, "r", STORE, IterationComplete(1))
    raises_clean(sched, ProtocolError, w.mark_iteration_complete)  # before iteration 1
    w.start_next_iteration()
    assert h.decision is None
    w.mark_iteration_complete()
    assert h.wait(1) is EXECUTE
