"""S3 concurrency: at most max_inflight SCHEDULED operations execute at once; scarce tokens go
to LOAD before STORE, then the earlier requirement, then arrival order; a starving STORE goes
next; a stuck operation never delays the operations of other requests."""

import time

import pytest

from kvsched.protocol import IterationComplete, LayerComplete
from spec_helpers import EXECUTE, IMMEDIATE, LOAD, STORE, counters, joined

pytestmark = pytest.mark.timeout(60)


def one_token(make_scheduler, starvation=10.0, **kw):
    """max_inflight=1 and a token already held by a blocker, so ready ops queue up."""
    s = make_scheduler(max_inflight=1, store_starvation_s=starvation, **kw)
    s.worker.create_slot("blocker")
    _, h0 = joined(s, "blocker", LOAD)
    assert h0.wait(1) is EXECUTE
    return s, h0


def wait_one(pending, timeout=1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = [n for n, h in pending.items() if h.decision is EXECUTE]
        if got:
            return got
        time.sleep(0.002)
    return []


def release_order(blocker, handles):
    order, pending, current = [], dict(handles), blocker
    while pending:
        current.mark_complete()
        got = wait_one(pending)
        assert len(got) == 1, f"exactly one op may hold the only token, got {got}"
        order.append(got[0])
        current = pending.pop(got[0])
    current.mark_complete()
    return order


def test_token_bound(make_scheduler):
    s = make_scheduler(max_inflight=2)
    s.worker.create_slot("r")
    hs = [joined(s, "r", LOAD)[1] for _ in range(5)]
    for i in range(5):
        # ops i and i+1 hold the two tokens (arrival order), the rest wait
        for j in range(i, min(i + 2, 5)):
            assert hs[j].wait(1) is EXECUTE
        assert all(h.decision is None for h in hs[i + 2:])
        assert counters(s)["inflight"] == min(2, 5 - i)
        hs[i].mark_complete()
    assert s.worker.is_complete("r")
    c = counters(s)
    assert c["inflight"] == 0 and c["peak_inflight"] == 2 and c["max_inflight"] == 2


def test_load_before_store(make_scheduler):
    s, h0 = one_token(make_scheduler)
    s.worker.create_slot("r")
    _, st = joined(s, "r", STORE)  # arrives first, still goes second
    _, ld = joined(s, "r", LOAD)
    assert st.decision is None and ld.decision is None
    assert release_order(h0, {"store": st, "load": ld}) == ["load", "store"]


def test_earlier_requirement_first(make_scheduler):
    s, h0 = one_token(make_scheduler)
    w = s.worker
    w.create_slot("r")
    for _ in range(3):
        w.start_next_iteration()  # every requirement below already holds at join
    reqs = {"L(5,2)": LayerComplete(5, 2), "L(1,2)": LayerComplete(1, 2),
            "IC(1)": IterationComplete(1), "L(7,1)": LayerComplete(7, 1), "none": None}
    handles = {name: joined(s, "r", LOAD, req)[1] for name, req in reqs.items()}
    # none first; IterationComplete(1) after every layer of iteration 1
    assert release_order(h0, handles) == ["none", "L(7,1)", "IC(1)", "L(1,2)", "L(5,2)"]


def test_kind_beats_requirement(make_scheduler):
    s, h0 = one_token(make_scheduler)
    w = s.worker
    w.create_slot("r")
    w.start_next_iteration()
    w.start_next_iteration()
    handles = {"store-early": joined(s, "r", STORE, LayerComplete(0, 1))[1],
               "load-late": joined(s, "r", LOAD, LayerComplete(3, 1))[1]}
    assert release_order(h0, handles) == ["load-late", "store-early"]


@pytest.mark.parametrize("kind", [LOAD, STORE])
def test_arrival_order(make_scheduler, kind):
    s, h0 = one_token(make_scheduler)
    s.worker.create_slot("r")
    handles = {i: joined(s, "r", kind, transfer_first=bool(i % 2))[1] for i in range(6)}
    assert release_order(h0, handles) == list(range(6))


def test_store_starvation_bound(make_scheduler):
    """A STORE that waited longer than store_starvation_s goes before ready loads."""
    s, h0 = one_token(make_scheduler, starvation=0.05)
    s.worker.create_slot("r")
    _, st = joined(s, "r", STORE)
    time.sleep(0.15)
    handles = {"store": st, "l1": joined(s, "r", LOAD)[1], "l2": joined(s, "r", LOAD)[1]}
    assert release_order(h0, handles) == ["store", "l1", "l2"]


def test_steady_loads_cannot_starve_a_store(make_scheduler):
    s, current = one_token(make_scheduler, starvation=0.05)
    s.worker.create_slot("r")
    _, st = joined(s, "r", STORE)
    loads = [joined(s, "r", LOAD)[1]]
    start = time.monotonic()
    while st.decision is None:
        assert time.monotonic() - start < 2.0, "the store starved"
        loads.append(joined(s, "r", LOAD)[1])  # always a fresh ready load
        current.mark_complete()
        nxt = [h for h in loads + [st] if h.decision is EXECUTE and h is not current]
        deadline = time.monotonic() + 1
        while not nxt and time.monotonic() < deadline:
            time.sleep(0.001)
            nxt = [h for h in loads + [st] if h.decision is EXECUTE and h is not current]
        assert len(nxt) == 1
        current = nxt[0]
        if current in loads:
            loads.remove(current)
        time.sleep(0.01)
    assert st.decision is EXECUTE
    assert time.monotonic() - start >= 0.04  # it went first only once it had starved


def test_immediate_takes_no_token(make_scheduler, new_uuid):
    s, h0 = one_token(make_scheduler)
    h = s.transfer.schedule("blocker", new_uuid(), mode=IMMEDIATE)
    assert h.decision is EXECUTE
    assert counters(s)["inflight"] == 1


def test_stuck_operation_never_delays_others(make_scheduler, new_uuid):
    """Halves that never meet their partner, and gated ops, hold no token."""
    s = make_scheduler(max_inflight=1)
    w, t = s.worker, s.transfer
    w.create_slot("stuck")
    w.enqueue("stuck", new_uuid(), LOAD)           # transfer half never sent
    t.schedule("stuck", new_uuid())                # worker half never sent
    t.schedule("ghost", new_uuid())                # slot never created
    joined(s, "stuck", LOAD, LayerComplete(0, 99))  # requirement far away
    w.create_slot("r")
    for _ in range(5):
        _, h = joined(s, "r", LOAD)
        assert h.wait(1) is EXECUTE
        h.mark_complete()
    assert w.is_complete("r")
    assert counters(s)["inflight"] == 0


def test_cancel_of_waiting_op_and_failure_release_tokens(make_scheduler):
    s, h0 = one_token(make_scheduler)
    w = s.worker
    w.create_slot("a")
    w.create_slot("b")
    _, ha = joined(s, "a", LOAD)
    _, hb = joined(s, "b", LOAD)
    w.cancel_slot("a")  # ha waited for a token: it is cancelled and never takes one
    h0.mark_complete(error="boom")  # a failed op frees its token too
    assert hb.wait(1) is EXECUTE
    assert ha.wait(1) is not EXECUTE
    hb.mark_complete()
    c = counters(s)
    assert c["inflight"] == 0 and c["peak_inflight"] == 1
