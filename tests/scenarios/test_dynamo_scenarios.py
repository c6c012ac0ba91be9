"""38 scenarios from the bug history of NVIDIA Dynamo's KV block manager (KVBM), in kvsched's
terms (docs/reliability.md, row "Dynamo's bug history"; the rules are docs/contract.md).

Each test is named ``test_scenario_NN_short_name``; its docstring quotes the scenario and says what
is asserted. Every test runs on both implementations (``make_scheduler`` of tests/conftest.py:
the C++ ``kvsched.Scheduler`` and ``kvsched.testing.ReferenceScheduler``). GPU-only parts are
covered in host form (numpy pools and the host backend, ``threading.Event`` in place of a CUDA
event) and the GPU-only remainder is skipped with the reason.

Notation of the scenarios: "op" means one uuid; "slot" one request_id; halves are W (worker,
``worker.enqueue``) and T (transfer, ``transfer.schedule``).
"""

from __future__ import annotations

import gc
import logging
import random
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import kvsched
from kvsched import IterationComplete, LayerComplete, LayerNameComplete
from kvsched.errors import (DuplicateOperationError, ProtocolError, SlotBusyError,
                            UnknownSlotError)
from kvsched.transfer.errors import TransferQueueFullError
from scenario_helpers import (CANCEL, EXECUTE, IMMEDIATE, LOAD, STORE, STRESS, counts, new_uuid,
                              peek, pools, write_report)

pytestmark = pytest.mark.timeout(60 if STRESS != "long" else 600)


def host_engine(s, **kw):
    kw.setdefault("workers", 2)
    return kvsched.TransferEngine(s, backend="host", **kw)


# ------------------------------------------------------------------------------- joins (1-3)

def test_scenario_01_w_first_join(make_scheduler):
    """1. W-first join: "W enqueued, then T registered -> exactly one execution; the counter
    reaches 1; is_complete is true." Asserts: the T handle is EXECUTE at once, a second T for the
    uuid is refused (one execution), after the mark completed == 1 and is_complete."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, LOAD)
    assert not w.is_complete("r")
    h = t.schedule("r", u)
    assert h.wait(1) is EXECUTE
    with pytest.raises(DuplicateOperationError):
        t.schedule("r", u)
    h.mark_complete()
    assert counts(w, "r") == (1, 1, 0, 0)
    assert w.is_complete("r")
    assert s.stats()["executed"] == 1


def test_scenario_02_t_first_join(make_scheduler):
    """2. T-first join: "T registered, then W -> exactly one execution; the T caller is unblocked
    with Execute." Asserts: a thread blocked in wait() on the T handle wakes with EXECUTE when the
    W half arrives, and only one EXECUTE is counted."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = new_uuid()
    h = t.schedule("r", u)
    got = {}
    th = threading.Thread(daemon=True, target=lambda: got.update(d=h.wait(10), at=time.monotonic()))
    th.start()
    time.sleep(0.05)
    assert "d" not in got                     # blocked: the W half is missing
    sent = time.monotonic()
    w.enqueue("r", u, STORE)
    th.join(5)
    assert got["d"] is EXECUTE and got["at"] - sent < 1.0
    h.mark_complete()
    assert s.stats()["executed"] == 1 and w.is_complete("r")


def test_scenario_03_t_before_slot_creation(make_scheduler):
    """3. "T before slot creation, W after. Joins correctly once the slot exists. No panic, and no
    execution before the slot exists." Asserts: the early T half stays undecided (no execution)
    while the rid has no slot, the W half before create_slot is refused (UnknownSlotError) and
    changes nothing, and after create_slot + W the op executes once."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    u = new_uuid()
    h = t.schedule("r", u)
    assert h.wait(0.05) is None
    with pytest.raises(UnknownSlotError):
        w.enqueue("r", u, LOAD)
    assert h.wait(0.05) is None and s.stats()["executed"] == 0
    w.create_slot("r")
    assert h.wait(0.05) is None
    w.enqueue("r", u, LOAD)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
    assert counts(w, "r") == (1, 1, 0, 0)


# ------------------------------------------------------------------------------- immediate (4-6, 9)

def test_scenario_04_immediate_result_before_slot_creation(make_scheduler):
    """4. "Immediate result before slot creation (single worker). Buffered, applied exactly once at
    creation, cleared at removal." Asserts: an IMMEDIATE result marked before the slot exists is
    credited once when the worker enqueues that uuid, and a re-created slot starts clean."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    u = new_uuid()
    h = t.schedule("r", u, mode=IMMEDIATE)
    assert peek(h) == "EXECUTE"
    h.mark_complete()
    w.create_slot("r")
    assert counts(w, "r") == (0, 0, 0, 0)   # nothing credited to the slot before the W half
    w.enqueue("r", u, LOAD, mode=IMMEDIATE)
    assert counts(w, "r") == (1, 1, 0, 0) and w.is_complete("r")
    assert w.take_finished() == ["r"]
    w.remove_slot("r")
    w.create_slot("r")
    assert counts(w, "r") == (0, 0, 0, 0)
    assert w.take_finished() == []


def test_scenario_05_immediate_before_creation_several_consumers(make_scheduler):
    """5. "Immediate result before slot creation, several consumers sharing one scheduler (the
    TP>1 pattern). Each slot instance gets the credit exactly once." Modelled as 4 ranks sharing
    one scheduler, each with its own slot and its own uuid: each slot is credited exactly once,
    with its own result (a failure of rank 2 stays in rank 2's slot)."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    ranks = [f"r@rank{k}" for k in range(4)]
    us = {rid: new_uuid() for rid in ranks}
    for rid in ranks:
        h = t.schedule(rid, us[rid], mode=IMMEDIATE)
        h.mark_complete(error="rank 2 failed" if rid.endswith("2") else None)
    del h
    for rid in reversed(ranks):
        w.create_slot(rid)
        w.enqueue(rid, us[rid], LOAD, mode=IMMEDIATE)
    for rid in ranks:
        failed = rid.endswith("2")
        assert counts(w, rid) == (1, int(not failed), int(failed), 0), rid
        assert w.is_complete(rid)
    assert sorted(w.take_finished()) == sorted(ranks)


def test_scenario_06_immediate_result_after_slot_removal(make_scheduler):
    """6. "Immediate result after slot removal. Must not leak, and must not credit a later slot
    with the same request_id (run remove -> re-create with the same id)." Asserts: a stale
    IMMEDIATE result for the request id, arriving after removal, does not complete or count in
    the re-created slot; the new slot completes only with its own op's result."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u1 = new_uuid()
    w.enqueue("r", u1, LOAD, mode=IMMEDIATE)
    t.schedule("r", u1, mode=IMMEDIATE).mark_complete()
    w.remove_slot("r")
    stale = t.schedule("r", new_uuid(), mode=IMMEDIATE)   # a result nobody will enqueue now
    stale.mark_complete()
    w.create_slot("r")
    assert counts(w, "r") == (0, 0, 0, 0)
    u3 = new_uuid()
    w.enqueue("r", u3, STORE, mode=IMMEDIATE)
    assert counts(w, "r") == (1, 0, 0, 0) and not w.is_complete("r")
    t.schedule("r", u3, mode=IMMEDIATE).mark_complete()
    assert counts(w, "r") == (1, 1, 0, 0) and w.is_complete("r")


def test_scenario_09_unknown_uuid_completion(make_scheduler):
    """9. "Unknown uuid completion. An Immediate result whose uuid was never registered must not
    change a slot's completion." Asserts: a stray IMMEDIATE result for the slot's request id
    leaves the slot incomplete with unchanged counts; the slot completes with its own result."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    mine = new_uuid()
    w.enqueue("r", mine, LOAD, mode=IMMEDIATE)
    for err in (None, "x"):
        t.schedule("r", new_uuid(), mode=IMMEDIATE).mark_complete(error=err)
    assert counts(w, "r") == (1, 0, 0, 0) and not w.is_complete("r")
    assert w.slot_status("r").errors == []
    t.schedule("r", mine, mode=IMMEDIATE).mark_complete()
    assert w.is_complete("r")


# ------------------------------------------------------------------------------- reuse, duplicates

def test_scenario_07_request_id_reuse(make_scheduler):
    """7. "Request-id reuse. Phase-1 slot (two Load ops) completes and is removed; a Phase-2 slot
    is created with the same id and Store ops; late T halves for Phase 2 that arrive between the
    removal and the re-creation still join with Phase 2." Asserts exactly that, and that nothing
    of phase 1 shows in phase 2's counts."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    loads = [new_uuid(), new_uuid()]
    for u in loads:
        w.enqueue("r", u, LOAD)
        h = t.schedule("r", u)
        assert h.wait(1) is EXECUTE
        h.mark_complete()
    assert w.is_complete("r")
    w.remove_slot("r")
    stores = [new_uuid(), new_uuid()]
    early = [t.schedule("r", u) for u in stores]        # between removal and re-creation
    assert all(h.wait(0.02) is None for h in early)
    w.create_slot("r")
    assert counts(w, "r") == (0, 0, 0, 0)
    for u in stores:
        w.enqueue("r", u, STORE)
    for h in early:
        assert h.wait(1) is EXECUTE
        h.mark_complete()
    assert counts(w, "r") == (2, 2, 0, 0) and w.is_complete("r")


def test_scenario_08_duplicate_halves(make_scheduler):
    """8. "Duplicate W, or duplicate T, for one uuid. The second is rejected with an error or
    ignored (idempotent). The scheduler must stay alive." Asserts: DuplicateOperationError for
    either duplicate, the first op unaffected (executes and completes once), and the scheduler
    keeps serving other requests."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, LOAD)
    with pytest.raises(DuplicateOperationError):
        w.enqueue("r", u, LOAD)
    h = t.schedule("r", u)
    with pytest.raises(DuplicateOperationError):
        t.schedule("r", u)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
    assert counts(w, "r") == (1, 1, 0, 0)
    w.create_slot("other")
    u2 = new_uuid()
    w.enqueue("other", u2, STORE)
    h2 = t.schedule("other", u2)
    assert h2.wait(1) is EXECUTE
    h2.mark_complete()
    assert w.is_complete("other")


# ------------------------------------------------------------------------------- removal (10-12)

def test_scenario_10_remove_slot_with_pending_t_first_op(make_scheduler):
    """10. "Remove a slot with a pending T-first op. The T caller receives a clean Cancel outcome
    ... The slot reports 'complete (cancelled)', no counter goes negative, and nothing leaks."
    kvsched's rule (docs/semantics.md): remove_slot alone does not cancel a T half waiting for its
    W half (it may belong to the next slot of the id); the engine's abort is cancel_slot (or the
    op_timeout deadline). Asserts: cancel_slot + remove_slot give the blocked T caller CANCEL,
    counters stay at zero (the W half never came), and with op_timeout alone the T half is
    CANCEL by its deadline."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    h = t.schedule("r", new_uuid())
    got = {}
    th = threading.Thread(daemon=True, target=lambda: got.update(d=h.wait(10)))
    th.start()
    time.sleep(0.02)
    w.cancel_slot("r")
    th.join(5)
    assert got["d"] is CANCEL
    assert counts(w, "r") == (0, 0, 0, 0) and w.is_complete("r")
    w.remove_slot("r")
    s2 = make_scheduler(op_timeout=0.1)
    s2.worker.create_slot("r")
    h2 = s2.transfer.schedule("r", new_uuid())
    s2.worker.remove_slot("r")
    started = time.monotonic()
    assert h2.wait(5) is CANCEL and time.monotonic() - started < 2.0


def test_scenario_11_remove_slot_with_pending_w_first_op(make_scheduler):
    """11. "Remove a slot with a pending W-first op. The marker is dropped; a T that arrives later
    for that uuid gets Cancel at once instead of hanging." Asserts: remove_slot with the open W op
    is SlotBusyError (nothing changes); after cancel_slot the slot is complete (cancelled 1) and
    removable; the late T half is CANCEL at once."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, STORE)
    with pytest.raises(SlotBusyError):
        w.remove_slot("r")
    assert counts(w, "r") == (1, 0, 0, 0)
    w.cancel_slot("r")
    assert counts(w, "r") == (1, 0, 0, 1)
    w.remove_slot("r")
    late = t.schedule("r", u)
    assert late.wait(0) is CANCEL


def test_scenario_12_t_for_request_id_that_never_existed(make_scheduler):
    """12. "T arrives for a removed request_id that never existed in this process. It gets a
    deterministic Cancel or error within a bounded time, never an indefinite wait." Asserts: with
    op_timeout it is CANCEL within the deadline (and says it timed out nowhere it could be
    credited); without one, cancel_slot(rid) by the engine cancels it at once; close() ends any
    that is left."""
    s = make_scheduler(op_timeout=0.1)
    h = s.transfer.schedule("ghost", new_uuid())
    started = time.monotonic()
    assert h.wait(5) is CANCEL and time.monotonic() - started < 2.0
    assert s.stats()["timed_out"] == 1
    s2 = make_scheduler()
    h2 = s2.transfer.schedule("ghost", new_uuid())
    s2.worker.cancel_slot("ghost")
    assert h2.wait(0) is CANCEL
    h3 = s2.transfer.schedule("ghost2", new_uuid())
    s2.close()
    assert h3.wait(1) is CANCEL


# ------------------------------------------------------------------------------- cancel (13, 14)

def test_scenario_13_cancel_racing_execute(make_scheduler):
    """13. "Cancel racing execute. Cancel issued after both halves joined but before the copy was
    launched -> Cancel. If the copy has already launched, the cancel is refused and the op
    completes normally. Each op ends with exactly one terminal state." Asserts, single-threaded:
    with one token, the running op completes normally after cancel_slot and the joined op that
    waited for the token is CANCEL; then 200 threaded races of cancel_slot against the decision,
    each op ending exactly once and the slot counts adding up."""
    s = make_scheduler(max_inflight=1)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    ua, ub = new_uuid(), new_uuid()
    for u in (ua, ub):
        w.enqueue("r", u, LOAD)
    ha, hb = t.schedule("r", ua), t.schedule("r", ub)
    assert ha.wait(1) is EXECUTE and hb.wait(0.02) is None
    w.cancel_slot("r")
    assert hb.wait(0) is CANCEL
    assert not w.is_complete("r")              # the launched copy still runs
    ha.mark_complete()
    assert counts(w, "r") == (2, 1, 0, 1) and w.is_complete("r")
    with pytest.raises(ProtocolError):
        hb.mark_complete()

    s2 = make_scheduler(max_inflight=2)
    w2, t2 = s2.worker, s2.transfer
    ends = {"completed": 0, "cancelled": 0}
    for i in range(200):
        rid = f"race{i}"
        w2.create_slot(rid)
        us = [new_uuid() for _ in range(3)]
        for u in us:
            w2.enqueue(rid, u, LOAD)
        hs = [t2.schedule(rid, u) for u in us]
        th = threading.Thread(daemon=True, target=w2.cancel_slot, args=(rid,))
        th.start()
        for h in hs:
            d = h.wait(5)
            assert d is not None
            if d is EXECUTE:
                h.mark_complete()
                ends["completed"] += 1
            else:
                ends["cancelled"] += 1
        th.join(5)
        st = w2.slot_status(rid)
        assert st.completed + st.cancelled == st.expected == 3 and st.failed == 0
        w2.remove_slot(rid)
    assert ends["completed"] + ends["cancelled"] == 600


def test_scenario_14_cancel_during_in_flight_copy_host(make_scheduler):
    """14. "Cancel during an in-flight cudaMemcpyAsync. Completion is reported only after the CUDA
    event fires. Device blocks are never released to the engine while a copy is pending." Host
    form: the copy waits on a threading.Event standing for the CUDA event. Asserts: cancel_slot
    while the copy is in flight does not end it; is_complete stays False until the event fires
    and the bytes land; then the op is completed (not cancelled) and the data is exact. (The CUDA
    event itself: the GPU tier, tests/transfer/test_cuda_backend.py.)"""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    src_arr, dst_arr, src, dst = pools()
    eng = host_engine(s)
    try:
        w.create_slot("r")
        u = new_uuid()
        w.enqueue("r", u, LOAD)
        h = t.schedule("r", u)
        assert h.wait(1) is EXECUTE
        fired = threading.Event()
        job = eng.submit(h, src=src, dst=dst, pairs=np.array([[3, 5]]), compute_event=fired)
        del h
        w.cancel_slot("r")
        time.sleep(0.05)
        assert not w.is_complete("r") and not job.done()
        assert not dst_arr.any()
        fired.set()
        assert job.wait(5)
        deadline = time.monotonic() + 2
        while not w.is_complete("r") and time.monotonic() < deadline:
            time.sleep(0.001)
        assert counts(w, "r") == (1, 1, 0, 0)
        assert np.array_equal(dst_arr[:, 5], src_arr[:, 3])
    finally:
        eng.close(5)


# ------------------------------------------------------------------------------- failures (15-19)

def test_scenario_15_failed_store(make_scheduler):
    """15. "Failed Store. The worker sees FAILED for that uuid; the leader does not register the
    destination blocks; the request still finishes (the failure is terminal, not a hang)." Asserts,
    through the host engine with an injected fault: slot_status shows the STORE failed with its
    uuid and reason, the destination blocks are untouched, the slot is complete and reported by
    take_finished."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    src_arr, dst_arr, src, dst = pools()

    def hook(job):
        raise OSError(f"host pool full for {job.uuid}")

    eng = host_engine(s, fault_hook=hook)
    try:
        w.create_slot("r")
        u = new_uuid()
        w.enqueue("r", u, STORE)
        h = t.schedule("r", u, requirement=None)
        assert h.wait(1) is EXECUTE
        eng.submit(h, src=src, dst=dst, pairs=np.array([[1, 2], [3, 4]])).wait(5)
        del h
        assert counts(w, "r") == (1, 0, 1, 0) and w.is_complete("r")
        (eu, msg), = w.slot_status("r").errors
        assert eu == u and "host pool full" in msg
        assert not dst_arr.any()
        assert w.take_finished() == ["r"]
    finally:
        eng.close(5)


def test_scenario_16_failed_load(make_scheduler):
    """16. "Failed Load. FAILED propagates with the block ids so the engine can recompute; the
    request is reported finished_recving in the same or an earlier step than its failed blocks."
    kvsched reports per uuid (the engine maps uuid -> block ids). Asserts: the failed LOAD's uuid
    and reason are in slot_status(rid).errors at the moment take_finished first reports the rid
    (same step), with the other LOAD of the request completed."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    good, bad = new_uuid(), new_uuid()
    for u in (good, bad):
        w.enqueue("r", u, LOAD)
    hg, hb = t.schedule("r", good), t.schedule("r", bad)
    assert hg.wait(1) is EXECUTE and hb.wait(1) is EXECUTE
    hg.mark_complete()
    assert w.take_finished() == []
    hb.mark_complete(error=IOError("blocks 7, 8 unreadable"))
    assert w.take_finished() == ["r"]
    st = w.slot_status("r")
    assert (st.completed, st.failed) == (1, 1)
    assert st.errors[0][0] == bad and "blocks 7, 8" in st.errors[0][1]


def test_scenario_17_partial_failure_across_workers(make_scheduler):
    """17. "Partial failure across workers (one of N ranks fails a Load). The leader-visible result
    is FAILED; the other ranks' completions don't mask it." Modelled with 4 schedulers, one per
    rank (each GPU worker process has its own), the same request and one LOAD op per rank; rank 2
    fails. Asserts: rank 2's slot shows the failure with its uuid, the other ranks completed, and
    the request-level aggregate (failed if any rank failed) is FAILED."""
    ranks = [make_scheduler() for _ in range(4)]
    us = [new_uuid() for _ in ranks]
    for k, s in enumerate(ranks):
        s.worker.create_slot("req")
        s.worker.enqueue("req", us[k], LOAD)
        h = s.transfer.schedule("req", us[k])
        assert h.wait(1) is EXECUTE
        h.mark_complete(error="NCCL peer lost" if k == 2 else None)
    statuses = [s.worker.slot_status("req") for s in ranks]
    assert all(s.worker.is_complete("req") for s in ranks)
    assert [st.failed for st in statuses] == [0, 0, 1, 0]
    assert statuses[2].errors[0][0] == us[2]
    aggregate = "FAILED" if any(st.failed for st in statuses) else "OK"
    assert aggregate == "FAILED"


def test_scenario_18_failure_after_success(make_scheduler):
    """18. "Failure after success (e.g., registration fails after the copy completed). No double
    counting: each uuid reaches its terminal state exactly once." Asserts: a failing mark after a
    completing mark raises ProtocolError and changes no counter (slot and stats)."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, STORE)
    h = t.schedule("r", u)
    assert h.wait(1) is EXECUTE
    h.mark_complete()
    before = (counts(w, "r"), s.stats()["completed"], s.stats()["failed"])
    with pytest.raises(ProtocolError):
        h.mark_complete(error="registration failed")
    assert (counts(w, "r"), s.stats()["completed"], s.stats()["failed"]) == before
    assert w.slot_status("r").errors == []


def test_scenario_19_dropping_handle_without_marking(make_scheduler, caplog):
    """19. "Dropping a completion handle without marking it. Converted to FAILED with a loud log and
    metric. No hang, and no abort of the process." Asserts: a delivered EXECUTE handle dropped in
    another thread fails its op within a second with a HandleDroppedError message, a warning or
    error on the kvsched logger and stats()["dropped"] == 1; the freed token lets the next op
    run."""
    s = make_scheduler(max_inflight=1)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u1, u2 = new_uuid(), new_uuid()
    for u in (u1, u2):
        w.enqueue("r", u, LOAD)
    box = [t.schedule("r", u1)]
    h2 = t.schedule("r", u2)
    assert box[0].wait(1) is EXECUTE and h2.wait(0.02) is None
    with caplog.at_level(logging.WARNING, logger="kvsched"):
        th = threading.Thread(daemon=True, target=lambda: (box.clear(), gc.collect()))
        th.start()
        th.join(5)
        deadline = time.monotonic() + 1.0
        while counts(w, "r")[2] == 0 and time.monotonic() < deadline:
            s.stats()
            time.sleep(0.005)
    assert counts(w, "r") == (2, 0, 1, 0)
    assert "HandleDroppedError" in w.slot_status("r").errors[0][1]
    assert s.stats()["dropped"] == 1
    assert any("HandleDroppedError" in r.getMessage() for r in caplog.records)
    assert h2.wait(1) is EXECUTE            # the dropped op's token came back
    h2.mark_complete()
    assert w.is_complete("r")


# ------------------------------------------------------------------------------- gating (20-24)

def test_scenario_20_layer_gating(make_scheduler):
    """20. "Layer gating. A Store op with requirement 'layer k of iteration i complete' must not
    start before the layer-k event of iteration i. It must start before iteration i's last layer
    when k < last (layer-wise overlap). Verify with ... timestamps." Host form with timestamps:
    a thread records when the STORE gated on layer 1 (of 4) is decided; asserts it is after the
    mark of layer 1 and before the mark of layer 3 (the engine's last layer), and by name too."""
    s = make_scheduler(layer_names=["l0", "l1", "l2", "l3"])
    w, t = s.worker, s.transfer
    w.create_slot("r")
    w.start_next_iteration()
    u, un = new_uuid(), new_uuid()
    w.enqueue("r", u, STORE)
    w.enqueue("r", un, STORE)
    h = t.schedule("r", u, requirement=LayerComplete(1, 1))
    hn = t.schedule("r", un, requirement=LayerNameComplete("l1", 1))
    decided = {}

    def watch(name, handle):
        handle.wait(10)
        decided[name] = time.perf_counter()

    ths = [threading.Thread(daemon=True, target=watch, args=(n, x)) for n, x in (("idx", h), ("name", hn))]
    for th in ths:
        th.start()
    marks = {}
    for layer in range(4):
        time.sleep(0.03)
        if layer == 1:
            assert not decided, "decided before its layer was marked"
        marks[layer] = time.perf_counter()
        w.mark_layer_complete(layer)
        time.sleep(0.03)
    for th in ths:
        th.join(5)
    for name in ("idx", "name"):
        assert marks[1] <= decided[name] < marks[3], (marks, decided)
    assert h.wait(0) is EXECUTE and hn.wait(0) is EXECUTE


def test_scenario_21_iteration_gating(make_scheduler):
    """21. "Iteration gating. An op gated on the end of iteration i does not run during iteration
    i; it runs right after EndIteration(i)." Asserts: IterationComplete(1) stays undecided through
    every layer of iteration 1 and is EXECUTE right after mark_iteration_complete()."""
    s = make_scheduler(num_layers=3)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, STORE)
    h = t.schedule("r", u, requirement=IterationComplete(1))
    assert w.start_next_iteration() == 1
    for layer in range(3):
        w.mark_layer_complete(layer)
        assert h.wait(0.01) is None
    w.mark_iteration_complete()
    assert h.wait(0.5) is EXECUTE


def test_scenario_22_gate_already_satisfied_at_registration(make_scheduler):
    """22. "Gate already satisfied at registration. An op whose requirement refers to a past
    iteration or layer executes immediately." Asserts: LayerComplete of a marked layer, of a past
    iteration and IterationComplete of a past iteration are EXECUTE at join, with no further
    progress."""
    s = make_scheduler(max_inflight=8)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    w.start_next_iteration()
    w.mark_layer_complete(0)
    w.mark_iteration_complete()
    w.start_next_iteration()                  # iteration 2
    w.mark_layer_complete(0)
    for req in (LayerComplete(0, 2), LayerComplete(5, 1), IterationComplete(1)):
        u = new_uuid()
        w.enqueue("r", u, STORE)
        assert t.schedule("r", u, requirement=req).wait(0.5) is EXECUTE, req


def test_scenario_23_missing_layer_signals(make_scheduler):
    """23. "Missing layer signals (hybrid/Mamba layers, or CUDA-graph replay that never calls
    per-layer hooks). A fallback end-of-iteration signal releases gated ops; nothing waits
    forever." Asserts: ops gated on LayerComplete(k, 1) for every k, with no per-layer mark, are
    EXECUTE once mark_iteration_complete() is called (contract S2, docs/contract.md)."""
    s = make_scheduler(num_layers=4, max_inflight=8)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    w.start_next_iteration()
    hs = []
    for k in range(4):
        u = new_uuid()
        w.enqueue("r", u, STORE)
        hs.append(t.schedule("r", u, requirement=LayerComplete(k, 1)))
    assert all(h.wait(0.01) is None for h in hs)
    w.mark_iteration_complete()                # graph replay: no per-layer hooks ran
    assert all(h.wait(0.5) is EXECUTE for h in hs)


def test_scenario_24_out_of_order_and_skipped_iterations(make_scheduler):
    """24. "Out-of-order and skipped iterations (iteration i+2 after i). Requirements up to i+2 are
    satisfied monotonically; no assert." kvsched numbers iterations itself (start_next_iteration
    returns the next), so an engine skipping hooks of iteration 2 starts 3 right after 2 started.
    Asserts: requirements on iteration 2 (layer and end) are satisfied when 3 starts, one on 3's
    end is not yet, and marking a layer again or out of order is a clean ProtocolError."""
    s = make_scheduler(num_layers=2, max_inflight=8)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    reqs = [LayerComplete(1, 2), IterationComplete(2), IterationComplete(3)]
    hs = []
    for req in reqs:
        u = new_uuid()
        w.enqueue("r", u, STORE)
        hs.append(t.schedule("r", u, requirement=req))
    assert w.start_next_iteration() == 1
    w.mark_layer_complete(0)
    w.mark_layer_complete(1)
    w.mark_iteration_complete()
    assert w.start_next_iteration() == 2       # iteration 2: no hooks at all
    assert all(h.wait(0.01) is None for h in hs)
    assert w.start_next_iteration() == 3
    assert hs[0].wait(0.5) is EXECUTE and hs[1].wait(0.5) is EXECUTE
    assert hs[2].wait(0.01) is None
    w.mark_layer_complete(0)
    with pytest.raises(ProtocolError):
        w.mark_layer_complete(0)               # repeated
    w.mark_iteration_complete()
    assert hs[2].wait(0.5) is EXECUTE


# ------------------------------------------------------------------------------- scale (25-27)

def test_scenario_25_many_requests(make_scheduler):
    """25. "Many requests. 10k slots, each with 1-4 ops, with random interleaving of CreateSlot, W,
    T, Immediate results, Remove and cancellations, across 8 producer threads. No lost
    completions, no double counts, a bounded memory high-water mark, and every slot reaches a
    terminal state." 8 producer threads (which also run the IMMEDIATE ops and cancel 5% of the
    requests), 4 executors taking decided handles from poll(); 10,000 slots (core) / 3,333
    (reference) in CI, 5x that in the long tier; a remover thread takes completed slots from
    take_finished() and removes them. Asserts: every slot is reported complete and removed, each
    op ended once (executor ledger), the global sums match stats(), the removed memory stays
    within its bound, no slot is left in the scheduler afterwards."""
    impl = make_scheduler.impl
    n = (50_000 if STRESS == "long" else 10_000) // (1 if impl == "core" else 3)
    s = make_scheduler(max_inflight=16, removed_memory=1024)
    w, t = s.worker, s.transfer
    rng = random.Random(25)
    plan = {f"m{i}": [(new_uuid(), rng.choice([LOAD, STORE]),
                       IMMEDIATE if rng.random() < 0.2 else kvsched.RequestMode.SCHEDULED,
                       rng.random() < 0.5) for _ in range(rng.randint(1, 4))] for i in range(n)}
    rids = list(plan)
    n_ops = sum(map(len, plan.values()))
    ledger, lock, failures = {}, threading.Lock(), []
    cancelled_rids, fully_enqueued = set(), set()
    done_producing = threading.Event()
    deadline = time.monotonic() + 50
    peak_memory = [0]

    def end(u, how):
        with lock:
            assert u not in ledger, f"{u} ended twice"
            ledger[u] = how

    def producer(k):
        for rid in rids[k::8]:
            w.create_slot(rid)
            for u, kind, mode, worker_first in plan[rid]:
                if worker_first:
                    w.enqueue(rid, u, kind, mode=mode)
                h = t.schedule(rid, u, mode=mode)
                if mode is IMMEDIATE:          # the transfer side runs it already: mark it
                    fail = u.int % 10 == 0
                    h.mark_complete(error="x" if fail else None)
                    end(u, "failed" if fail else "completed")
                del h                           # SCHEDULED: executors get it from poll()
                if not worker_first:
                    w.enqueue(rid, u, kind, mode=mode)
            if rng.random() < 0.05:
                w.cancel_slot(rid)
                with lock:
                    cancelled_rids.add(rid)
            fully_enqueued.add(rid)

    def executor():
        while not (done_producing.is_set() and len(ledger) == n_ops):
            for h in t.poll(max_items=32, timeout=0.02):
                if h.decision is EXECUTE:
                    fail = h.uuid.int % 10 == 0
                    h.mark_complete(error="x" if fail else None)
                    end(h.uuid, "failed" if fail else "completed")
                else:
                    end(h.uuid, "cancelled")
            h = None
            if time.monotonic() > deadline:
                raise AssertionError(f"{n_ops - len(ledger)} operations never polled")

    def remover():
        """Removes slots as take_finished() reports them (cost: completions, not open slots)."""
        left, candidates = set(rids), set()
        while left:
            candidates.update(w.take_finished())
            for rid in list(candidates):
                if rid in fully_enqueued and w.is_complete(rid):
                    st = w.slot_status(rid)
                    assert st.expected == len(plan[rid])
                    w.remove_slot(rid)
                    left.discard(rid)
                    candidates.discard(rid)
            peak_memory[0] = max(peak_memory[0], s.stats()["removed_memory_size"])
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(left)} slots never reported complete, e.g. "
                                     f"{sorted(left)[:3]}")
            time.sleep(0.002)

    def guard(fn, *a):
        def run():
            try:
                fn(*a)
            except BaseException as e:  # noqa: BLE001
                failures.append(repr(e))
        return run

    prods = [threading.Thread(daemon=True, target=guard(producer, k)) for k in range(8)]
    execs = [threading.Thread(daemon=True, target=guard(executor)) for _ in range(4)]
    rem = threading.Thread(daemon=True, target=guard(remover))
    started = time.monotonic()
    for th in prods + execs + [rem]:
        th.start()
    for th in prods:
        th.join(60)
    done_producing.set()
    for th in execs + [rem]:
        th.join(60)
        assert not th.is_alive(), "hang"
    assert not failures, failures
    all_ops = [u for ops in plan.values() for u, *_ in ops]
    assert set(ledger) == set(all_ops)
    st = s.stats()
    assert st["completed"] == sum(v == "completed" for v in ledger.values())
    assert st["failed"] == sum(v == "failed" for v in ledger.values())
    assert st["slots"] == 0 and st["removed_memory_size"] <= 1024 and peak_memory[0] <= 1024
    assert st["peak_inflight"] <= 16
    write_report(f"scenario_25_{impl}", {"slots": n, "operations": len(all_ops),
                                         "threads": 13, "wall_s": round(time.monotonic() - started, 2),
                                         "cancelled_requests": len(cancelled_rids)})


def test_scenario_26_concurrency_limit(make_scheduler):
    """26. "Concurrency limit. With a cap of N in-flight copies, never more than N are launched;
    queued ops keep FIFO or priority order; Load ops take priority over Store ops." Asserts with
    max_inflight=2: two run at once, the rest wait; as tokens free up, every LOAD goes before any
    STORE, each kind in arrival order (no requirement)."""
    s = make_scheduler(max_inflight=2, store_starvation_s=60)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    hs = {}
    order = [("S1", STORE), ("S2", STORE), ("L1", LOAD), ("S3", STORE), ("L2", LOAD), ("L3", LOAD)]
    for name, kind in order:
        u = new_uuid()
        w.enqueue("r", u, kind)
        hs[name] = t.schedule("r", u)
    started = [n for n, h in hs.items() if h.wait(0.02) is EXECUTE]
    assert started == ["S1", "S2"] and s.stats()["inflight"] == 2
    run_order = list(started)
    running = list(started)
    while running:
        hs[running.pop(0)].mark_complete()
        newly = [n for n, h in hs.items() if n not in run_order and peek(h) == "EXECUTE"]
        assert len(newly) <= 1 and s.stats()["inflight"] <= 2
        run_order += newly
        running += newly
    assert run_order == ["S1", "S2", "L1", "L2", "L3", "S3"]
    assert s.stats()["peak_inflight"] == 2


def test_scenario_27_head_of_line_isolation(make_scheduler):
    """27. "Head-of-line isolation. One permanently stuck op (its W half never sent) does not delay
    ops of other requests." Asserts: with one token and a stuck T half of request 'stuck' (and a
    stuck W half of another), 50 ops of other requests each execute at once."""
    s = make_scheduler(max_inflight=1)
    w, t = s.worker, s.transfer
    w.create_slot("stuck")
    w.create_slot("stuck-w")
    stuck_t = t.schedule("stuck", new_uuid())       # its W half never comes
    w.enqueue("stuck-w", new_uuid(), LOAD)           # its T half never comes
    w.create_slot("r")
    for _ in range(50):
        u = new_uuid()
        w.enqueue("r", u, LOAD)
        h = t.schedule("r", u)
        assert h.wait(0.5) is EXECUTE
        h.mark_complete()
    assert stuck_t.wait(0) is None
    assert counts(w, "r") == (50, 50, 0, 0)


# ------------------------------------------------------------------------------- engine (28-31, 37, 38)

def test_scenario_28_backpressure(make_scheduler):
    """28. "Backpressure. When the transfer->scheduler queue is full, producers block or receive an
    error; results are never dropped." In kvsched: schedule() never blocks (it only registers);
    the transfer engine's submission is bounded. Asserts: with max_pending=1 and a copy in flight,
    submit raises TransferQueueFullError at once and leaves the handle untouched (still EXECUTE and
    open); after the first copy lands, the retry succeeds and both results are counted."""
    s = make_scheduler(max_inflight=4)
    w, t = s.worker, s.transfer
    src_arr, dst_arr, src, dst = pools()
    eng = host_engine(s, max_pending=1)
    try:
        w.create_slot("r")
        hs = []
        for _ in range(2):
            u = new_uuid()
            w.enqueue("r", u, STORE)
            hs.append(t.schedule("r", u))
        assert all(h.wait(1) is EXECUTE for h in hs)
        gate = threading.Event()
        j1 = eng.submit(hs[0], src=src, dst=dst, pairs=np.array([[0, 0]]), compute_event=gate)
        started = time.monotonic()
        with pytest.raises(TransferQueueFullError):
            eng.submit(hs[1], src=src, dst=dst, pairs=np.array([[1, 1]]))
        assert time.monotonic() - started < 0.5
        assert peek(hs[1]) == "EXECUTE" and counts(w, "r") == (2, 0, 0, 0)
        gate.set()
        assert j1.wait(5)
        eng.submit(hs[1], src=src, dst=dst, pairs=np.array([[1, 1]])).wait(5)
        deadline = time.monotonic() + 2
        while not w.is_complete("r") and time.monotonic() < deadline:
            time.sleep(0.001)
        assert counts(w, "r") == (2, 2, 0, 0)
        assert np.array_equal(dst_arr[:, :2], src_arr[:, :2])
    finally:
        eng.close(5)


def test_scenario_29_polling_versus_notification(make_scheduler):
    """29. "Polling versus notification. is_complete becomes true no later than one poll after the
    last CUDA event fires; an optional callback or eventfd fires exactly once per slot." Host
    form: once the engine's job for the last op is done, the very next is_complete() is True, and
    take_finished() (kvsched's notification) reports the slot exactly once over many calls."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    src_arr, dst_arr, src, dst = pools()
    eng = host_engine(s)
    try:
        for r in range(20):
            rid = f"r{r}"
            w.create_slot(rid)
            u = new_uuid()
            w.enqueue(rid, u, LOAD)
            h = t.schedule(rid, u)
            assert h.wait(1) is EXECUTE
            job = eng.submit(h, src=src, dst=dst, pairs=np.array([[r, r]]))
            del h
            assert job.wait(5)
            assert w.is_complete(rid)           # the first poll after the completion
        seen = []
        for _ in range(5):
            seen += w.take_finished()
        assert sorted(seen) == sorted(f"r{r}" for r in range(20))
    finally:
        eng.close(5)


def test_scenario_30_memory_ordering_smoke(make_scheduler):
    """30. "Memory-ordering smoke test. After is_complete returns true on thread A, host-side data
    written by the copy-completion thread (e.g., registration metadata) is visible." Host form,
    300 rounds: the engine's worker threads copy and mark; thread A spins on is_complete and, the
    moment it is True, reads the destination block and metadata written before the mark (by a
    fault_hook-free completion): both must be the new values. (Run under TSAN: the C++ tier.)"""
    s = make_scheduler(max_inflight=8)
    w, t = s.worker, s.transfer
    src_arr, dst_arr, src, dst = pools(blocks=300, width=256)
    eng = host_engine(s)
    bad = []
    try:
        for r in range(300):
            rid = f"r{r}"
            w.create_slot(rid)
            u = new_uuid()
            w.enqueue(rid, u, LOAD)
            h = t.schedule(rid, u)
            assert h.wait(1) is EXECUTE
            eng.submit(h, src=src, dst=dst, pairs=np.array([[r, r]]))
            del h
            while not w.is_complete(rid):
                pass
            if not np.array_equal(dst_arr[:, r], src_arr[:, r]):
                bad.append(r)
        assert not bad, f"data not visible after is_complete in rounds {bad[:5]}"
    finally:
        eng.close(5)


def test_scenario_31_teardown_with_ops_in_flight():
    """31. "Teardown with ops in flight. Shutdown waits for the CUDA events or cancels and then
    waits. No panics, no unacked or unmarked guards, and the process exits cleanly." Asserts, in a
    fresh interpreter, for both implementations: with copies in flight (gated), undecided and
    queued ops, engine.close() waits for the copies (their marks count after close()),
    Scheduler.close() cancels the rest, and the process exits with status 0 and nothing on
    stderr but the expected log lines."""
    code = textwrap.dedent("""
        import threading, uuid, numpy as np, kvsched
        from kvsched.testing import ReferenceScheduler
        for cls in (kvsched.Scheduler, ReferenceScheduler):
            s = cls(max_inflight=2)
            w, t = s.worker, s.transfer
            arr = np.ones((2, 8, 16), np.float32); out = np.zeros_like(arr)
            src, dst = kvsched.BlockPool.from_array(arr), kvsched.BlockPool.from_array(out)
            eng = kvsched.TransferEngine(s, backend="host", workers=2)
            w.create_slot("r")
            gate = threading.Event()
            hs = []
            for i in range(4):
                u = uuid.uuid4(); w.enqueue("r", u, kvsched.TransferKind.LOAD); hs.append(t.schedule("r", u))
            pending = t.schedule("r", uuid.uuid4())          # W half never comes
            jobs = [eng.submit(h, src=src, dst=dst, pairs=np.array([[i, i]]), compute_event=gate)
                    for i, h in enumerate(hs) if h.wait(0.05) == kvsched.Decision.EXECUTE]
            assert len(jobs) == 2
            s.close()                                        # cancels the queued and undecided
            assert pending.wait(1) == kvsched.Decision.CANCEL
            threading.Timer(0.05, gate.set).start()
            assert eng.close(10)                             # waits for the copies in flight
            assert all(j.ok for j in jobs), [j.error for j in jobs]
            st = s.stats()
            assert st["completed"] == 2 and st["inflight"] == 0, st
        print("clean")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"
    assert "Traceback" not in proc.stderr and "terminate" not in proc.stderr, proc.stderr


def test_scenario_37_stress_with_real_copies_host(make_scheduler):
    """37. "Stress with real copies (GPU available). 1-64 concurrent requests offloading N x 2 MiB
    blocks D2H on a dedicated stream, then H2D back. Byte-exact compare, and measure GB/s against
    a plain cudaMemcpyAsync baseline (the target is >90% of the baseline)." Host form: 32
    concurrent requests store 64 KiB blocks to a host pool through the scheduler and engine, then
    load them back into a zeroed pool; asserts a byte-exact round trip. The GB/s-vs-memcpy target
    needs a GPU: kvsched-bench --backend cuda (bench/), not a test."""
    s = make_scheduler(max_inflight=8)
    w, t = s.worker, s.transfer
    n_req, blocks_per = 32, 4
    n = n_req * blocks_per
    gpu = np.random.default_rng(37).integers(0, 255, (2, n, 32768), dtype=np.uint8)
    host = np.zeros_like(gpu)
    back = np.zeros_like(gpu)
    gp, hp, bp = (kvsched.BlockPool.from_array(a) for a in (gpu, host, back))
    eng = host_engine(s, workers=2)
    failures = []

    def request(i):
        try:
            rid = f"req{i}"
            blocks = np.arange(i * blocks_per, (i + 1) * blocks_per)
            pairs = np.stack([blocks, blocks], axis=1)
            for kind, a, b in ((STORE, gp, hp), (LOAD, hp, bp)):
                u = new_uuid()
                w.enqueue(rid, u, kind)
                h = t.schedule(rid, u)
                assert h.wait(10) is EXECUTE
                eng.submit(h, src=a, dst=b, pairs=pairs).wait(10)
                del h
            assert counts(w, rid) == (2, 2, 0, 0)
        except BaseException as e:  # noqa: BLE001
            failures.append(repr(e))

    try:
        for i in range(n_req):
            w.create_slot(f"req{i}")
        ths = [threading.Thread(daemon=True, target=request, args=(i,)) for i in range(n_req)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(30)
        assert not failures, failures
        assert np.array_equal(back, gpu)
    finally:
        eng.close(5)


def test_scenario_38_no_cpu_blocking_on_forward_thread(make_scheduler):
    """38. "No CPU blocking on the forward thread. The engine-facing calls ... return within
    microseconds even while copies are queued; no cuEventSynchronize on the caller's thread."
    Host form: while 16 copies are queued behind a gate that never opens during the step, the
    forward thread's calls (enqueue, schedule, start_next_iteration, mark_layer_complete,
    mark_iteration_complete, is_complete, take_finished, engine.submit) each return quickly:
    asserts the median under 1 ms and the slowest under 50 ms (a loaded 2-core machine)."""
    s = make_scheduler(max_inflight=64, num_layers=4)
    w, t = s.worker, s.transfer
    src_arr, dst_arr, src, dst = pools(blocks=64)
    eng = host_engine(s, workers=1)
    gate = threading.Event()
    times = []

    def timed(fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        times.append(time.perf_counter() - t0)
        return out

    try:
        w.create_slot("r")
        timed(w.start_next_iteration)
        for i in range(16):
            u = new_uuid()
            timed(w.enqueue, "r", u, STORE)
            if i % 4 == 0:
                timed(w.mark_layer_complete, i // 4)     # layer i // 4 computed: its 4 stores go
            h = timed(t.schedule, "r", u, requirement=LayerComplete(i // 4, 1))
            assert h.wait(1) is EXECUTE
            timed(eng.submit, h, src=src, dst=dst, pairs=np.array([[i, i]]), compute_event=gate)
            del h
            timed(w.is_complete, "r")
            timed(w.take_finished)
        timed(w.mark_iteration_complete)
        assert eng.pending == 16
        times.sort()
        assert times[len(times) // 2] < 1e-3 and times[-1] < 0.05, times[-5:]
    finally:
        gate.set()
        eng.close(5)


# ------------------------------------------------------------------------------- lifecycle (32-36)

def test_scenario_32_engine_double_finish(make_scheduler):
    """32. "Engine double-finish (abort plus stop in the same step, #6681). A second
    request_finished is idempotent; at most one 'finished_sending' per request id." Asserts:
    cancel_slot twice is idempotent (counts unchanged), the rid is reported by take_finished once,
    and a second remove_slot is a clean UnknownSlotError, not a crash."""
    s = make_scheduler()
    w = s.worker
    w.create_slot("r")
    u = new_uuid()
    w.enqueue("r", u, STORE)
    w.cancel_slot("r")
    snap = counts(w, "r")
    w.cancel_slot("r")
    assert counts(w, "r") == snap == (1, 0, 0, 1)
    assert w.take_finished() == ["r"]
    assert w.take_finished() == []
    w.remove_slot("r")
    with pytest.raises(UnknownSlotError):
        w.remove_slot("r")
    assert w.take_finished() == []


def test_scenario_33_finish_while_onboarding(make_scheduler):
    """33. "Finish while onboarding (the request is aborted in WAITING_FOR_REMOTE_KVS). Loads still
    reach a terminal state; the request is reported exactly once; the blocks are not reused before
    the copies end." Asserts: after cancel_slot the running LOADs keep the slot incomplete (blocks
    not reusable) until marked, the queued LOAD is cancelled, and take_finished reports the rid
    once, when the last LOAD ends."""
    s = make_scheduler(max_inflight=2)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    hs = []
    for _ in range(3):
        u = new_uuid()
        w.enqueue("r", u, LOAD)
        hs.append(t.schedule("r", u))
    assert [h.wait(0.5) for h in hs[:2]] == [EXECUTE, EXECUTE] and hs[2].wait(0.02) is None
    w.cancel_slot("r")
    assert hs[2].wait(0) is CANCEL
    assert not w.is_complete("r") and w.take_finished() == []
    hs[0].mark_complete()
    assert not w.is_complete("r") and w.take_finished() == []
    hs[1].mark_complete()
    assert w.is_complete("r") and w.take_finished() == ["r"]
    assert w.take_finished() == []
    assert counts(w, "r") == (3, 2, 0, 1)


def test_scenario_34_preemption_with_pending_ops(make_scheduler):
    """34. "Preemption with pending ops. Preempting a request with un-shipped or in-flight ops
    resolves every op (cancel or complete) before its blocks can be reallocated." Asserts: after
    cancel_slot, every op of the slot (W-only, T-only, gated, running) is resolved, is_complete
    only once the running one ends, and the rid can be re-created clean for the resumed request."""
    s = make_scheduler(max_inflight=4)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    w.start_next_iteration()
    running, gated, w_only = new_uuid(), new_uuid(), new_uuid()
    w.enqueue("r", running, STORE)
    hr = t.schedule("r", running)
    w.enqueue("r", gated, STORE)
    hg = t.schedule("r", gated, requirement=IterationComplete(5))
    w.enqueue("r", w_only, STORE)
    ht = t.schedule("r", new_uuid())               # T-only
    assert hr.wait(0.5) is EXECUTE
    w.cancel_slot("r")
    assert hg.wait(0) is CANCEL and ht.wait(0) is CANCEL
    assert not w.is_complete("r")
    hr.mark_complete()
    assert w.is_complete("r") and counts(w, "r") == (3, 1, 0, 2)
    late = t.schedule("r", w_only)                 # the W-only op's T half, late
    assert late.wait(0) is CANCEL
    w.remove_slot("r")
    w.create_slot("r")                             # resumed: a clean slot
    assert counts(w, "r") == (0, 0, 0, 0)
    u = new_uuid()
    w.enqueue("r", u, LOAD)
    h = t.schedule("r", u)
    assert h.wait(0.5) is EXECUTE                  # not cancelled: the new slot is not
    h.mark_complete()


def test_scenario_35_zero_op_slot(make_scheduler):
    """35. "Zero-op slot. A slot created with no ops is immediately complete; removing it needs no
    other message." Asserts: is_complete at once, counts zero, remove_slot succeeds, nothing is
    reported by take_finished (nothing ended)."""
    s = make_scheduler()
    w = s.worker
    w.create_slot("r")
    assert w.is_complete("r") and counts(w, "r") == (0, 0, 0, 0)
    assert w.take_finished() == []
    w.remove_slot("r")
    assert s.stats()["slots"] == 0 if "slots" in s.stats() else True


def test_scenario_36_slot_removed_before_create_slot_processed(make_scheduler):
    """36. "Slot removed before its CreateSlot was processed (cross-channel reordering). There is
    no orphan state afterwards." Two orders: (a) remove_slot before create_slot is a clean
    UnknownSlotError and leaves nothing (a later create/remove works); (b) the engine aborts the
    request (cancel_slot) before the worker processed create_slot, a leader half already arrived;
    then create_slot and the worker half arrive: the op must end (cancelled) and the slot must
    complete, with no orphan left (the leader's CANCEL is held for the worker half; found by
    tests/model, regression test tests/model/test_regressions.py)."""
    s = make_scheduler()
    w, t = s.worker, s.transfer
    with pytest.raises(UnknownSlotError):
        w.remove_slot("a")
    w.create_slot("a")
    assert w.is_complete("a")
    w.remove_slot("a")
    # (b)
    u = new_uuid()
    w.cancel_slot("b")
    h = t.schedule("b", u)
    assert h.wait(0) is CANCEL
    w.create_slot("b")
    w.enqueue("b", u, LOAD)
    assert w.is_complete("b"), counts(w, "b")
    w.remove_slot("b")
