"""S2 gating: an operation is decided EXECUTE only once its requirement holds."""

import pytest

from kvsched.protocol import IterationComplete, LayerComplete, LayerNameComplete
from spec_helpers import EXECUTE, LOAD, STORE, joined

pytestmark = pytest.mark.timeout(60)

NAMES = ["embed", "attn0", "attn1", "attn2"]


def test_iterations_count_from_one(sched):
    w = sched.worker
    assert [w.start_next_iteration() for _ in range(3)] == [1, 2, 3]


def test_no_requirement_ready_on_join_before_any_iteration(sched):
    sched.worker.create_slot("r")
    _, h = joined(sched, "r", STORE)
    assert h.wait(1) is EXECUTE


@pytest.mark.parametrize("transfer_first", [False, True])
def test_layer_complete_gates_until_that_layer(sched, transfer_first):
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", STORE, LayerComplete(2, 1), transfer_first=transfer_first)
    assert h.decision is None
    w.start_next_iteration()
    assert h.decision is None
    w.mark_layer_complete(0)
    w.mark_layer_complete(1)
    assert h.decision is None
    w.mark_layer_complete(2)
    assert h.wait(1) is EXECUTE


def test_layer_of_iteration_zero_needs_iteration_one(sched):
    """Nothing is marked in iteration 0; LayerComplete(k, 0) holds once iteration 1 starts."""
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", STORE, LayerComplete(0, 0))
    assert h.decision is None
    w.start_next_iteration()
    assert h.wait(1) is EXECUTE


def test_layer_name_complete(make_scheduler):
    s = make_scheduler(layer_names=NAMES)
    w = s.worker
    w.create_slot("r")
    _, h = joined(s, "r", STORE, LayerNameComplete("attn1", 1))
    w.start_next_iteration()
    w.mark_layer_complete("embed")
    w.mark_layer_complete(1)  # indexes and names mix
    assert h.decision is None
    w.mark_layer_complete("attn1")
    assert h.wait(1) is EXECUTE


def test_iteration_complete(sched):
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", STORE, IterationComplete(1))
    w.start_next_iteration()
    for k in range(5):
        w.mark_layer_complete(k)
    assert h.decision is None  # every layer marked is not the iteration marked
    w.mark_iteration_complete()
    assert h.wait(1) is EXECUTE


def test_iteration_complete_satisfied_by_next_iteration(sched):
    w = sched.worker
    w.create_slot("r")
    _, h = joined(sched, "r", STORE, IterationComplete(1))
    w.start_next_iteration()
    assert h.decision is None
    w.start_next_iteration()
    assert h.wait(1) is EXECUTE


def test_later_iteration_satisfies_earlier_layer(sched):
    w = sched.worker
    w.create_slot("r")
    w.start_next_iteration()
    w.mark_layer_complete(0)
    _, h = joined(sched, "r", STORE, LayerComplete(7, 1))  # layer 7 never marked
    assert h.decision is None
    assert w.start_next_iteration() == 2
    assert h.wait(1) is EXECUTE


def test_mark_iteration_complete_satisfies_its_layers(sched):
    """Engines whose layers skip the per-layer hook (CUDA graphs, Mamba) must not strand stores."""
    w = sched.worker
    w.create_slot("r")
    w.start_next_iteration()
    _, h3 = joined(sched, "r", STORE, LayerComplete(3, 1))
    _, h_next = joined(sched, "r", STORE, LayerComplete(0, 2))
    w.mark_iteration_complete()
    assert h3.wait(1) is EXECUTE
    assert h_next.decision is None  # the next iteration's layers are not satisfied


@pytest.mark.parametrize("req", [LayerComplete(1, 1), LayerComplete(5, 1), IterationComplete(1),
                                 LayerComplete(0, 2), IterationComplete(0)])
def test_requirement_already_satisfied_at_join(sched, req):
    w = sched.worker
    w.create_slot("r")
    w.start_next_iteration()
    w.mark_layer_complete(0)
    w.mark_layer_complete(1)
    w.mark_iteration_complete()
    w.start_next_iteration()
    w.mark_layer_complete(0)
    _, h = joined(sched, "r", STORE, req)
    assert h.wait(1) is EXECUTE


def test_requirement_satisfied_before_worker_half(sched, new_uuid):
    """The requirement travels with the transfer half; it can hold before the worker half comes."""
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u_ = new_uuid()
    h = t.schedule("r", u_, requirement=LayerComplete(0, 1))
    w.start_next_iteration()
    w.mark_layer_complete(0)
    assert h.decision is None  # still waiting for its worker half
    w.enqueue("r", u_, STORE)
    assert h.wait(1) is EXECUTE


def test_never_execute_before_requirement(sched):
    """Step through the layers; after every mark exactly the satisfied operations are decided."""
    w = sched.worker
    w.create_slot("r")
    ops = {(k, i): joined(sched, "r", STORE, LayerComplete(k, i))[1]
           for i in (1, 2) for k in range(4)}
    it_ops = {i: joined(sched, "r", STORE, IterationComplete(i))[1] for i in (1, 2)}

    def expect(done):  # done(k, i) -> should be decided
        for (k, i), h in ops.items():
            if done(k, i):
                assert h.wait(1) is EXECUTE, (k, i)
            else:
                assert h.decision is None, (k, i)

    expect(lambda k, i: False)
    w.start_next_iteration()
    for layer in range(4):
        w.mark_layer_complete(layer)
        expect(lambda k, i, layer=layer: i == 1 and k <= layer)
        assert it_ops[1].decision is None
    w.start_next_iteration()
    assert it_ops[1].wait(1) is EXECUTE
    w.mark_layer_complete(0)
    expect(lambda k, i: i == 1 or k == 0)
    w.mark_iteration_complete()
    expect(lambda k, i: True)
    assert it_ops[2].wait(1) is EXECUTE


def test_gated_load_and_store_both_gate(sched):
    w = sched.worker
    w.create_slot("r")
    _, hl = joined(sched, "r", LOAD, LayerComplete(0, 1))
    _, hs = joined(sched, "r", STORE, LayerComplete(0, 1))
    assert hl.decision is None and hs.decision is None
    w.start_next_iteration()
    w.mark_layer_complete(0)
    assert hl.wait(1) is EXECUTE and hs.wait(1) is EXECUTE
