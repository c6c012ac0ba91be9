"""Deadlines expiring mid-flight under many threads (S12), on both implementations.

Scheduler(op_timeout=0.15, max_inflight=1). At one Barrier, 20 threads start:
* a holder joins one operation and keeps its only token for 0.6 s (four deadlines);
* "queued" threads join ready operations (no requirement) that can only wait for that token:
  they must never time out (S12: ready and waiting only for a token is never timed out), so each
  ends EXECUTE, and the executors mark them;
* "orphan" threads send operations that can never be decided: a worker half without its transfer
  half, a transfer half without its worker half (slot exists), and a joined operation gated on
  an iteration that never comes. Each must be decided CANCEL by the deadline (the handle's
  wait() returns CANCEL, well before its own timeout), counted in ``cancelled`` and recorded in
  ``slot_status(rid).errors`` with a message saying it timed out;
* progress threads mark iterations meanwhile (the gated requirement is far ahead).
Checked: every wait returns; the figures add up exactly (timed_out == orphans).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

import kvsched
from kvsched import Decision, IterationComplete, TransferKind
from kvsched.testing import ReferenceScheduler
from history import SCALE, STRESS, guarded, write_report

pytestmark = pytest.mark.timeout(60 if STRESS != "long" else 600)

TIMEOUT = 0.15
LOAD = TransferKind.LOAD


@pytest.mark.parametrize("impl", ["core", "reference"])
def test_deadlines_expire_mid_flight(impl):
    cls = kvsched.Scheduler if impl == "core" else ReferenceScheduler
    s = cls(max_inflight=1, op_timeout=TIMEOUT, num_layers=2)
    w, t = s.worker, s.transfer
    n_queued, n_each = 6 * SCALE, 3 * SCALE   # per orphan kind
    rids = {"hold": "hold", **{f"q{i}": f"q{i}" for i in range(n_queued)},
            **{f"o{i}": f"o{i}" for i in range(3)}}
    for rid in rids:
        w.create_slot(rid)
    barrier = threading.Barrier(1 + n_queued + 3 + 2 + 1)
    results, failures = {}, []
    timed_out_uuids = {f"o{i}": [] for i in range(3)}
    lock = threading.Lock()
    stop = threading.Event()

    def guard(fn):
        return guarded(barrier, failures, fn)

    def holder():
        u = uuid.uuid4()
        w.enqueue("hold", u, LOAD)
        h = t.schedule("hold", u)
        assert h.wait(2) is Decision.EXECUTE
        time.sleep(4 * TIMEOUT)          # the only token is held across four deadlines
        h.mark_complete()

    def queued(i):
        time.sleep(0.01)                 # after the holder took the token
        u = uuid.uuid4()
        w.enqueue(f"q{i}", u, LOAD)
        h = t.schedule(f"q{i}", u)
        d = h.wait(10)                   # waits for the token, much longer than op_timeout
        with lock:
            results[u] = d
        if d is Decision.EXECUTE:
            h.mark_complete()

    def orphans(kind):
        rid = f"o{kind}"
        for _ in range(n_each):
            u = uuid.uuid4()
            h = None
            if kind == 0:                # worker half only
                w.enqueue(rid, u, LOAD)
            elif kind == 1:              # transfer half only
                h = t.schedule(rid, u)
            else:                        # joined, gated on an iteration that never comes
                w.enqueue(rid, u, LOAD)
                h = t.schedule(rid, u, requirement=IterationComplete(10**6))
            started = time.monotonic()
            with lock:
                timed_out_uuids[rid].append(u)
            if h is not None:
                d = h.wait(10)
                waited = time.monotonic() - started
                assert d is Decision.CANCEL, d
                assert waited < TIMEOUT + 1.0, f"deadline fired after {waited:.2f} s"
            time.sleep(0.01)

    forward = threading.Lock()  # two threads take turns as the forward pass (one at a time, as
    # an engine's forward thread; interleaved marks would be out of order by construction)

    def progress():
        while not stop.is_set():
            with forward:
                w.start_next_iteration()
                w.mark_layer_complete(0)
                w.mark_layer_complete(1)
                w.mark_iteration_complete()
            time.sleep(0.005)

    ths = [threading.Thread(daemon=True, target=guard(holder), name="H")]
    ths += [threading.Thread(daemon=True, target=guard(lambda i=i: queued(i)), name=f"Q{i}")
            for i in range(n_queued)]
    ths += [threading.Thread(daemon=True, target=guard(lambda k=k: orphans(k)), name=f"O{k}") for k in range(3)]
    ths += [threading.Thread(daemon=True, target=guard(progress), name=f"P{k}") for k in range(2)]
    for th in ths:
        th.start()
    barrier.wait(10)
    for th in ths[:-2]:
        th.join(30)
        assert not th.is_alive(), f"{th.name} hangs"
    stop.set()
    for th in ths[-2:]:
        th.join(10)
    assert not failures, failures

    # ready operations that only waited for the token: never timed out
    assert len(results) == n_queued
    assert all(d is Decision.EXECUTE for d in results.values()), results
    # orphans: decided CANCEL by the deadline, counted and explained in the slot
    deadline = time.monotonic() + 2 * TIMEOUT + 1.0
    while time.monotonic() < deadline and not w.is_complete("o0"):
        time.sleep(0.01)   # the worker-only orphans have no handle to wait on
    for k in range(3):
        rid = f"o{k}"
        st = w.slot_status(rid)
        enqueued = 0 if k == 1 else n_each
        assert (st.expected, st.cancelled, st.completed, st.failed) == (enqueued, enqueued, 0, 0), st
        if k != 1:
            assert w.is_complete(rid)
            errs = dict(st.errors)
            assert set(errs) == set(timed_out_uuids[rid]), (errs, timed_out_uuids[rid])
            assert all("timed out" in m for m in errs.values()), errs
    for rid in [f"q{i}" for i in range(n_queued)] + ["hold"]:
        st = w.slot_status(rid)
        assert (st.expected, st.completed, st.errors) == (1, 1, []), (rid, st)
    stats = s.stats()
    assert stats["timed_out"] == 3 * n_each, stats["timed_out"]
    assert stats["peak_inflight"] <= 1
    s.close()
    write_report(f"concurrency_deadlines_{impl}", {
        "threads": len(ths) + 1, "op_timeout_s": TIMEOUT, "queued_for_token": n_queued,
        "timed_out": stats["timed_out"], "orphans_per_kind": n_each})
