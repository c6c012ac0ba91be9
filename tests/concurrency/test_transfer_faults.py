"""Scheduler + TransferEngine (host backend) under many threads with injected copy failures.

16 request threads each run several requests: create the slot, enqueue LOAD/STORE worker halves,
schedule the transfer halves (either order), wait for the decision and submit EXECUTE handles to
the engine, which copies with numpy on 2 worker threads and marks each handle. The engine's
``fault_hook`` fails a fixed, seeded quarter of the jobs (RuntimeError "injected fault <uuid>");
a chaos thread cancels a few requests while their operations are in flight.

Checked: every operation ends exactly once (completed, failed or cancelled, per slot_status of its
request and per the engine's stats); exactly the injected failures are failed, each visible in
slot_status(rid).errors with the fault's message (S11); every completed copy is byte-exact in its
own destination blocks and failed ones left theirs untouched; nothing hangs.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import numpy as np
import pytest

import kvsched
from kvsched import Decision, RequestMode, TransferKind
from kvsched.errors import KvschedError
from kvsched.testing import ReferenceScheduler
from history import SCALE, STRESS, guarded, write_report

pytestmark = pytest.mark.timeout(90 if STRESS != "long" else 900)

LAYERS, BLOCK = 2, 64      # float32 elements per block and layer


@pytest.mark.parametrize("impl", ["core", "reference"])
def test_host_engine_faults_under_threads(impl):
    cls = kvsched.Scheduler if impl == "core" else ReferenceScheduler
    rng = random.Random(99)
    n_threads, per_thread, ops_per_req = 16, 6 * SCALE, 3
    n_ops = n_threads * per_thread * ops_per_req
    src_arr = np.random.default_rng(5).standard_normal((LAYERS, n_ops, BLOCK)).astype(np.float32)
    dst_arr = np.zeros_like(src_arr)
    src = kvsched.BlockPool.from_array(src_arr)
    dst = kvsched.BlockPool.from_array(dst_arr)
    s = cls(max_inflight=4)
    w, t = s.worker, s.transfer
    plans = []   # (rid, uuid, block, kind, mode, worker_first)
    for k in range(n_threads):
        for j in range(per_thread):
            rid = f"{impl}-t{k}-r{j}"
            for _ in range(ops_per_req):
                plans.append((rid, uuid.UUID(int=rng.getrandbits(128)), len(plans),
                              rng.choice([TransferKind.LOAD, TransferKind.STORE]),
                              RequestMode.IMMEDIATE if rng.random() < 0.15 else RequestMode.SCHEDULED,
                              rng.random() < 0.5))
    faulty = {u for _, u, *_ in plans if rng.random() < 0.25}
    injected = []

    def fault_hook(job):
        if job.uuid in faulty:
            injected.append(job.uuid)
            raise RuntimeError(f"injected fault {job.uuid}")

    eng = kvsched.TransferEngine(s, backend="host", workers=2, fault_hook=fault_hook,
                                 max_pending=4096)
    by_rid = {}
    for p in plans:
        by_rid.setdefault(p[0], []).append(p)
    rids = list(by_rid)
    barrier = threading.Barrier(n_threads + 2)
    failures, submitted, cancelled_seen = [], [], []
    lock = threading.Lock()
    done = threading.Event()

    def request_thread(k):
        mine = [r for r in rids if r.startswith(f"{impl}-t{k}-")]
        for rid in mine:
            w.create_slot(rid)
            handles = []
            for _, u, block, kind, mode, worker_first in by_rid[rid]:
                if worker_first:
                    w.enqueue(rid, u, kind, mode=mode)
                    handles.append((u, block, t.schedule(rid, u, mode=mode)))
                else:
                    handles.append((u, block, t.schedule(rid, u, mode=mode)))
                    w.enqueue(rid, u, kind, mode=mode)
            time.sleep(0.001)   # room for the chaos thread's cancels
            # submit whichever is decided first: waiting for them in order could deadlock, with
            # the tokens held by later EXECUTE handles of the same thread
            end = time.monotonic() + 30
            while handles:
                u, block, h = handles.pop(0)
                d = h.wait(0.001)
                if d is None:
                    assert time.monotonic() < end, f"{u} undecided after 30 s"
                    handles.append((u, block, h))
                elif d is Decision.CANCEL:
                    with lock:
                        cancelled_seen.append(u)
                else:
                    eng.submit(h, src=src, dst=dst, pairs=np.array([[block, block]]))
                    with lock:
                        submitted.append(u)
                del h
            end = time.monotonic() + 30
            while not w.is_complete(rid):
                assert time.monotonic() < end, f"{rid} never completed: {w.slot_status(rid)}"
                time.sleep(0.001)

    def chaos():
        crng = random.Random(7)
        while not done.is_set():
            rid = crng.choice(rids)
            try:
                w.cancel_slot(rid)
            except KvschedError:
                pass
            time.sleep(0.0005)

    def guard(fn):
        return guarded(barrier, failures, fn)

    ths = [threading.Thread(daemon=True, target=guard(lambda k=k: request_thread(k)), name=f"R{k}")
           for k in range(n_threads)]
    ths.append(threading.Thread(daemon=True, target=guard(chaos), name="X"))
    started = time.monotonic()
    for th in ths:
        th.start()
    barrier.wait(10)
    for th in ths[:-1]:
        th.join(60 * SCALE)
        assert not th.is_alive(), f"{th.name} hangs"
    done.set()
    ths[-1].join(10)
    assert not failures, failures
    assert eng.wait_idle(10)
    wall = time.monotonic() - started

    # every operation ended exactly once, as the engine and the slot both say
    failed_uuids, completed, cancelled = set(), 0, 0
    for rid, ps in by_rid.items():
        st = w.slot_status(rid)
        assert st.expected == len(ps) and st.completed + st.failed + st.cancelled == st.expected, st
        completed, cancelled = completed + st.completed, cancelled + st.cancelled
        for u, msg in st.errors:
            assert "injected fault" in msg and str(u) in msg, msg
            failed_uuids.add(u)
        assert len(st.errors) == st.failed
    ran = set(submitted)
    assert len(ran) == len(submitted) and not ran & set(cancelled_seen)
    assert failed_uuids == faulty & ran, (len(failed_uuids), len(faulty & ran))
    assert len(injected) == len(set(injected)) == len(failed_uuids)
    assert completed == len(ran - faulty)
    assert cancelled == len(cancelled_seen)
    est = eng.stats()
    assert (est["completed"], est["failed"]) == (completed, len(failed_uuids)), est
    # bytes: completed copies exact, failed and cancelled ones untouched
    for _, u, block, *_ in plans:
        got = dst_arr[:, block]
        if u in ran and u not in faulty:
            assert np.array_equal(got, src_arr[:, block]), u
        else:
            assert not got.any(), u
    for rid in rids:
        w.remove_slot(rid)
    assert eng.close(10)
    s.close()
    write_report(f"concurrency_transfer_faults_{impl}", {
        "threads": len(ths) + 1, "operations": n_ops, "executed": len(ran),
        "faults_injected": len(injected), "cancelled": cancelled, "wall_s": round(wall, 2)})
