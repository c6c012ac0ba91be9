"""Bounded memory under many threads (S4 backlog, S6 removed memory), both implementations.

* removed memory: 16 threads run thousands of short requests (create, both halves, mark, remove)
  with Scheduler(removed_memory=64) while a thread reads stats(): the remembered uuids never
  exceed 64, the oldest are forgotten and counted, take_finished reports each rid at most once
  and only rids that exist.
* poll backlog: 16 threads schedule operations and let the handles go before reading them
  (undelivered: the scheduler keeps them for poll) with Scheduler(poll_backlog=8,
  max_inflight=32) and nobody
  polling: the backlog stays within 8, evicted EXECUTE operations nobody holds fail as dropped
  (their tokens come back), and every slot completes: nothing waits for ever.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid

import pytest

import kvsched
from kvsched import Decision, TransferKind
from kvsched.testing import ReferenceScheduler
from history import SCALE, STRESS, guarded, write_report

pytestmark = pytest.mark.timeout(60 if STRESS != "long" else 600)
IMPLS = {"core": kvsched.Scheduler, "reference": ReferenceScheduler}


def _run(threads, target, watcher):
    barrier = threading.Barrier(len(threads) + 2)
    failures, stop = [], threading.Event()

    def guard(fn, *a):
        return guarded(barrier, failures, fn, *a)

    ths = [threading.Thread(daemon=True, target=guard(target, k), name=f"R{k}") for k in threads]
    wt = threading.Thread(daemon=True, target=guard(watcher, stop), name="watch")
    for th in ths + [wt]:
        th.start()
    barrier.wait(10)
    for th in ths:
        th.join(40)
        assert not th.is_alive(), f"{th.name} hangs"
    stop.set()
    wt.join(10)
    assert not failures, failures


@pytest.mark.parametrize("impl", IMPLS)
def test_removed_memory_stays_bounded(impl):
    s = IMPLS[impl](max_inflight=8, removed_memory=64)
    w, t = s.worker, s.transfer
    n_threads, per_thread = 16, 60 * SCALE
    reported, peaks = [], []

    def requests(k):
        for j in range(per_thread):
            rid = f"m{k}-{j}"
            w.create_slot(rid)
            u = uuid.uuid4()
            w.enqueue(rid, u, TransferKind.STORE)
            h = t.schedule(rid, u)
            assert h.wait(10) is Decision.EXECUTE
            h.mark_complete()
            if j % 3 == 0:
                reported.extend(w.take_finished())   # from any thread, racing the watcher's
            w.remove_slot(rid)

    def watcher(stop):
        while not stop.is_set():
            st = s.stats()
            peaks.append(st["removed_memory_size"])
            assert st["removed_memory_size"] <= 64, st
            reported.extend(w.take_finished())
            time.sleep(0.0005)

    _run(range(n_threads), requests, watcher)
    st = s.stats()
    assert st["removed_memory_size"] == 64
    assert st["removed_forgotten"] == n_threads * per_thread - 64
    assert len(reported) == len(set(reported)), "a rid was reported twice"
    assert set(reported) <= {f"m{k}-{j}" for k in range(n_threads) for j in range(per_thread)}
    s.close()
    write_report(f"concurrency_removed_memory_{impl}", {
        "threads": n_threads + 2, "requests": n_threads * per_thread, "removed_memory": 64,
        "peak_removed_memory_size": max(peaks, default=0), "forgotten": st["removed_forgotten"],
        "take_finished_reported": len(reported)})


@pytest.mark.parametrize("impl", IMPLS)
def test_poll_backlog_stays_bounded(impl):
    # more tokens than backlog: decided handles overflow it (with max_inflight <= poll_backlog,
    # the undelivered EXECUTE handles would keep every token, by design: S4)
    s = IMPLS[impl](max_inflight=32, poll_backlog=8)
    w, t = s.worker, s.transfer
    n_threads, per_thread = 16, 20 * SCALE
    peaks = []

    def requests(k):
        for j in range(per_thread):
            rid = f"b{k}-{j}"
            w.create_slot(rid)
            u = uuid.uuid4()
            w.enqueue(rid, u, TransferKind.LOAD)
            t.schedule(rid, u)     # the handle is let go at once, undelivered
            gc.collect(0)

    def watcher(stop):
        while not stop.is_set():
            st = s.stats()
            peaks.append(st["poll_backlog"])
            assert st["poll_backlog"] <= 8, st
            time.sleep(0.0005)

    _run(range(n_threads), requests, watcher)
    # every operation ends: decided ones beyond the backlog, once evicted and held by nobody,
    # fail as dropped and free their tokens; the last 8 stay pollable (nobody polls)
    rids = [f"b{k}-{j}" for k in range(n_threads) for j in range(per_thread)]
    end = time.monotonic() + 5
    while sum(not w.is_complete(r) for r in rids) > 8 and time.monotonic() < end:
        s.stats()
        time.sleep(0.01)
    open_ = [r for r in rids if not w.is_complete(r)]
    assert len(open_) <= 8, f"{len(open_)} slots never completed"
    st = s.stats()
    evicted = st.get("backlog_evicted", st.get("poll_evicted"))
    assert evicted >= len(rids) - 8
    assert st["inflight"] <= 8 and st["poll_backlog"] <= 8
    failed = [r for r in rids if w.is_complete(r)]
    for r in failed[:50]:
        stt = w.slot_status(r)
        assert stt.failed == 1 and "HandleDroppedError" in stt.errors[0][1], stt
    # the backlog that remains is still handed out by poll, once
    got = t.poll(max_items=64, timeout=0)
    assert len(got) == len({h.uuid for h in got}) <= 8
    for h in got:
        if h.decision is Decision.EXECUTE:
            h.mark_complete()
    del got, h
    s.close()
    write_report(f"concurrency_poll_backlog_{impl}", {
        "threads": n_threads + 2, "operations": len(rids), "poll_backlog": 8,
        "peak_poll_backlog": max(peaks, default=0), "evicted": evicted})


def test_core_queues_do_not_grow_without_take_finished_or_poll():
    """An engine that reads decisions with wait()/decision and completion with is_complete(),
    and never calls take_finished() or poll(): the finished queue drops removed slots past a
    threshold and the poll queue drops delivered entries, so neither grows with the number of
    operations (a memory leak otherwise: each entry keeps its slot or operation alive)."""
    s = kvsched.Scheduler(max_inflight=64)
    w, t = s.worker, s.transfer
    for i in range(6000):
        rid = f"r{i % 50}"
        w.create_slot(rid)
        handles = []
        for _ in range(2):
            u = uuid.uuid4()
            w.enqueue(rid, u, TransferKind.LOAD)
            handles.append(t.schedule(rid, u))
        for h in handles:
            assert h.wait(0) is Decision.EXECUTE
            h.mark_complete()
        assert w.is_complete(rid)
        w.remove_slot(rid)
    st = s.stats()
    assert st["finished_backlog"] <= 2048, st["finished_backlog"]
    assert st["poll_backlog"] <= 4, st["poll_backlog"]
    s.close()
