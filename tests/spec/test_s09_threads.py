"""S9 threads: every method may be called from any thread at once; blocking waits release the
GIL and take a timeout; `await h` never blocks the event loop."""

import asyncio
import random
import threading
import time
import uuid
from collections import Counter

import pytest

from spec_helpers import CANCEL, EXECUTE, LOAD, STORE, counters, joined, wait_until

pytestmark = pytest.mark.timeout(60)


def test_many_threads_exact_counts(make_scheduler):
    """Two worker threads, two transfer threads, a canceller racing schedule, four executors
    and a take_finished thread; both join orders; exact final counts."""
    MAX, R, K = 4, 64, 32
    s = make_scheduler(max_inflight=MAX)
    w, t = s.worker, s.transfer
    rng = random.Random(1234)
    rids = [f"req{i}" for i in range(R)]
    ops = {rid: [uuid.uuid4() for _ in range(K)] for rid in rids}
    kind = {u: LOAD if j % 3 else STORE for rid in rids for j, u in enumerate(ops[rid])}
    fails = {u for rid in rids for j, u in enumerate(ops[rid]) if j % 7 == 3}
    # order 0: every transfer half before create_slot; 1: worker halves first; 2: racing
    order = {rid: i % 3 for i, rid in enumerate(rids)}
    cancelled = {rid for i, rid in enumerate(rids) if i % 4 == 1}
    created = {rid: threading.Event() for rid in rids}
    t_sent = {rid: threading.Event() for rid in rids}
    w_sent = {rid: threading.Event() for rid in rids}
    first_exec = {rid: threading.Event() for rid in rids}
    lock = threading.Lock()
    seen, errors, finished = [], [], []
    executing = [0, 0]  # now, peak
    stop = threading.Event()

    def guarded(fn):
        def run(*a):
            try:
                fn(*a)
            except BaseException as e:  # reported by the main thread
                errors.append(e)
        return run

    @guarded
    def worker_thread(mine):
        for rid in mine:  # same partition and order as the transfer thread: no deadlock
            if order[rid] == 0:
                assert t_sent[rid].wait(20)
            w.create_slot(rid)
            created[rid].set()
            us = ops[rid][:]
            rng_local = random.Random(rid)
            rng_local.shuffle(us)
            for u in us:
                w.enqueue(rid, u, kind[u])
            w_sent[rid].set()

    @guarded
    def transfer_thread(mine):
        for rid in mine:
            if order[rid] == 1:
                assert w_sent[rid].wait(20)
            for u in ops[rid]:
                t.schedule(rid, u)  # the handle is dropped undelivered: the scheduler keeps it
            t_sent[rid].set()

    @guarded
    def canceller():
        for rid in sorted(cancelled):
            assert first_exec[rid].wait(20)  # some ops executed, others (likely) not yet
            time.sleep(rng.random() * 0.0005)
            w.cancel_slot(rid)

    @guarded
    def executor():
        while not stop.is_set():
            for h in t.poll(max_items=16, timeout=0.01):
                d = h.decision
                with lock:
                    seen.append((h.request_id, h.uuid, d))
                if d is EXECUTE:
                    first_exec[h.request_id].set()
                    with lock:
                        executing[0] += 1
                        executing[1] = max(executing[1], executing[0])
                    time.sleep(0)
                    with lock:
                        executing[0] -= 1  # before the mark, which frees the token
                    h.mark_complete(error="injected" if h.uuid in fails else None)

    @guarded
    def taker():
        while not stop.is_set():
            got = w.take_finished()
            with lock:
                finished.extend(got)
            time.sleep(0.001)

    producers = [threading.Thread(target=worker_thread, args=(rids[i::2],)) for i in range(2)]
    producers += [threading.Thread(target=transfer_thread, args=(rids[i::2],)) for i in range(2)]
    producers.append(threading.Thread(target=canceller))
    consumers = [threading.Thread(target=executor) for _ in range(4)]
    consumers.append(threading.Thread(target=taker))
    for th in producers + consumers:
        th.start()
    for th in producers:
        th.join(30)
    assert not errors, errors
    assert wait_until(lambda: len(seen) == R * K, timeout=30), (len(seen), R * K)
    assert wait_until(lambda: all(w.is_complete(r) for r in rids), timeout=5)
    stop.set()
    for th in consumers:
        th.join(10)
    assert not errors, errors
    finished.extend(w.take_finished())

    # each operation decided and delivered exactly once
    assert len(seen) == R * K
    assert Counter(u for _, u, _ in seen).most_common(1)[0][1] == 1
    by_rid = {rid: Counter() for rid in rids}
    for rid, u, d in seen:
        if d is EXECUTE:
            by_rid[rid]["failed" if u in fails else "completed"] += 1
        else:
            assert d is CANCEL
            by_rid[rid]["cancelled"] += 1
    for rid in rids:
        st = w.slot_status(rid)
        c = by_rid[rid]
        assert (st.expected, st.completed, st.failed, st.cancelled) == \
               (K, c["completed"], c["failed"], c["cancelled"]), rid
        assert len(st.errors) == c["failed"]
        if rid not in cancelled:
            assert c["cancelled"] == 0
    totals = sum(by_rid.values(), Counter())
    cs = counters(s)
    assert cs["scheduled"] == cs["enqueued"] == R * K
    assert cs["executed"] == totals["completed"] + totals["failed"]
    assert (cs["completed"], cs["failed"], cs["cancelled"]) == \
           (totals["completed"], totals["failed"], totals["cancelled"])
    assert cs["inflight"] == 0 and cs["dropped"] == 0 and cs["timed_out"] == 0
    assert 1 <= cs["peak_inflight"] <= MAX
    assert executing[1] <= MAX
    assert set(finished) == set(rids)
    # the cancels really raced: some cancelled slots had executed operations too
    assert totals["cancelled"] > 0
    assert any(by_rid[r]["cancelled"] and by_rid[r]["completed"] + by_rid[r]["failed"]
               for r in cancelled)


def test_blocked_waiters_do_not_block_others(sched):
    """Eight threads blocked in wait() and one in poll() leave the scheduler usable at full
    speed from the main thread (their waits release the GIL and the lock)."""
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    us = [uuid.uuid4() for _ in range(8)]
    hs = [t.schedule("r", u) for u in us]
    results = [None] * 8

    def waiter(i):
        results[i] = hs[i].wait(timeout=10)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(8)]
    poller = threading.Thread(target=lambda: t.poll(timeout=0.5))
    for th in threads + [poller]:
        th.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    w.create_slot("busy")
    for _ in range(300):
        _, h = joined(sched, "busy", LOAD)
        assert h.wait(1) is EXECUTE
        h.mark_complete()
    assert time.monotonic() - t0 < 5.0
    for u in us:
        w.enqueue("r", u, LOAD)
    for th in threads:
        th.join(5)
        assert not th.is_alive()
    poller.join(5)
    assert results == [EXECUTE] * 8


def test_wait_timeout_returns_none(sched):
    h = sched.transfer.schedule("r", uuid.uuid4())
    t0 = time.monotonic()
    assert h.wait(timeout=0.1) is None
    assert 0.08 <= time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    assert sched.transfer.poll(timeout=0.1) == []
    assert 0.08 <= time.monotonic() - t0 < 2.0


def test_await_does_not_block_the_loop(sched):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    u = uuid.uuid4()
    h = t.schedule("r", u)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        tk = asyncio.ensure_future(ticker())
        threading.Timer(0.2, lambda: w.enqueue("r", u, LOAD)).start()
        d = await asyncio.wait_for(h, 5)
        tk.cancel()
        return d, ticks

    d, ticks = asyncio.run(main())
    assert d is EXECUTE
    assert ticks >= 10  # the loop kept running while the handle was undecided
    h.mark_complete()
    assert w.is_complete("r")


def test_many_awaits_in_one_loop(sched):
    w, t = sched.worker, sched.transfer
    w.create_slot("r")
    us = [uuid.uuid4() for _ in range(50)]
    hs = [t.schedule("r", u) for u in us]

    async def main():
        def join_all():
            for u in us:
                w.enqueue("r", u, LOAD)
        threading.Timer(0.05, join_all).start()
        return await asyncio.wait_for(asyncio.gather(*hs), 10)

    assert asyncio.run(main()) == [EXECUTE] * 50


def test_concurrent_double_mark_counts_once(sched):
    """Many threads race to mark one handle: exactly one wins, the rest get ProtocolError."""
    from kvsched.errors import ProtocolError

    w = sched.worker
    w.create_slot("r")
    for _ in range(20):
        _, h = joined(sched, "r", LOAD)
        assert h.wait(1) is EXECUTE
        wins, losses = [], []
        barrier = threading.Barrier(8)

        def marker():
            barrier.wait()
            try:
                h.mark_complete()
                wins.append(1)
            except ProtocolError:
                losses.append(1)

        threads = [threading.Thread(target=marker) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(5)
        assert (len(wins), len(losses)) == (1, 7)
    st = w.slot_status("r")
    assert (st.expected, st.completed) == (20, 20)
    assert counters(sched)["completed"] == 20
