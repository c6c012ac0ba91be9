"""Many-thread stress of the scheduler with recorded histories (STYLE.md B2, B5, B7).

One run: W worker threads create slots and enqueue worker halves, T leader threads schedule the
transfer halves (either order: each operation is planned worker-first, transfer-first or
whichever comes first), E executors wait for decisions and end operations (complete, fail with an
error, mark twice, or hand the handle to a dropper thread that lets it go), a progress thread runs
iterations (sometimes without per-layer marks), chaos threads cancel and remove slots and call
the observers (is_complete, slot_status, take_finished, poll, stats) at random. All threads start
at one Barrier. Variants: request ids reused for several slots one after the other; close()
fired by a closer thread in the middle of the run (instead of at the end) while "orphan" waiters
are blocked in ``wait()``/``poll()`` without a timeout.

Checked afterwards (every check is sound: it cannot fail on a correct scheduler):
* no hang: every thread ends before the run's deadline; every slot that chaos did not remove
  early completes (S3: no ready operation waits forever); close() wakes every blocked waiter
  within a second (S10);
* exactly once: every handle reached exactly one terminal event in the test's ledger (S4);
* gating: when an executor sees EXECUTE, the requirement holds in the shadow progress (S2);
* tokens: "seen EXECUTE, not yet marked" never exceeds max_inflight, nor does
  stats()["peak_inflight"] (S3); stats()["removed_memory_size"] stays within removed_memory (S6);
* poll hands each handle out at most once (S4);
* per-rid linearizability of the recorded history against history's sequential model (B5).

Sizes: KVSCHED_STRESS=long multiplies the number of requests by 10 and draws a new seed per run
(printed; KVSCHED_SEED=N replays one).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import queue
import random
import threading
import time
import uuid

import pytest

import kvsched
from kvsched import IterationComplete, LayerComplete, RequestMode, TransferKind
from kvsched.errors import KvschedError, ProtocolError, SchedulerClosedError
from kvsched.testing import ReferenceScheduler
from history import (SCALE, STRESS, Event, Ledger, Progress, Recorder, check_linearizable,
                     write_report)

pytestmark = pytest.mark.timeout(120 if STRESS != "long" else 1800)

SEED = int(os.environ.get("KVSCHED_SEED", time.time_ns() % 10**9 if STRESS == "long" else 1234))
MODES = {"S": RequestMode.SCHEDULED, "I": RequestMode.IMMEDIATE}
LAYERS = 4
MEMORY = 4096  # removed uuids remembered: far more than one run needs, so late halves are CANCEL


class Plan:
    __slots__ = ("rid", "inc", "u", "kind", "mode", "order", "fate", "w_done", "t_done")

    def __init__(self, rid, inc, rng):
        self.rid, self.inc = rid, inc
        self.u = uuid.UUID(int=rng.getrandbits(128))
        self.kind = rng.choice([TransferKind.LOAD, TransferKind.STORE])
        self.mode = "I" if rng.random() < 0.2 else "S"
        # Either half first, also for a reused rid (a transfer half that finds the rid cancelled
        # by its previous incarnation is held CANCEL for the new slot's worker half).
        self.order = rng.choice(["W", "T", "any"])
        self.fate = rng.choices(["ok", "fail", "second", "drop"], [6, 2, 1, 1])[0]
        self.w_done, self.t_done = threading.Event(), threading.Event()


def run_stress(cls, *, n_rids, max_inflight, seed, impl, incarnations=1, close_midway=False,
               threads=(6, 6, 8, 2), orphans=0):
    rng = random.Random(seed)
    s = cls(max_inflight=max_inflight, num_layers=LAYERS, removed_memory=MEMORY)
    w, t = s.worker, s.transfer
    rec, ledger, prog = Recorder(), Ledger(), Progress()
    rids = [f"{impl}-r{i}" for i in range(n_rids)]
    plans = {(rid, inc): [Plan(rid, inc, rng) for _ in range(rng.randint(1, 4))]
             for rid in rids for inc in range(incarnations)}
    all_plans = [p for ps in plans.values() for p in ps]
    n_w, n_t, n_e, n_chaos = threads
    n_threads = n_w + n_t + n_e + n_chaos + 2 + orphans + (1 if close_midway else 0)
    barrier = threading.Barrier(n_threads + 1)
    stop = threading.Event()          # progress, chaos: the run is over
    producers_done = threading.Event()  # worker and leader threads ended: executors may stop
    closed = threading.Event()
    exec_q: queue.Queue = queue.Queue()
    drop_q: queue.Queue = queue.Queue()
    live = {}                         # rid -> incarnation whose create_slot returned
    failures = []
    polled = set()
    polled_lock = threading.Lock()
    stuck = []
    woke = []
    counts = dict.fromkeys(("calls", "cancel_slot", "remove_slot", "dropped", "failed_marks",
                            "second_marks", "waits", "take_finished", "polls",
                            "closed_errors", "marks_after_close"), 0)
    deadline = time.monotonic() + (60 if STRESS != "long" else 900)

    def guard(fn):
        def run():
            try:
                barrier.wait(30)
                fn()
            except SchedulerClosedError:
                if not closed.is_set():
                    failures.append((threading.current_thread().name, "closed before close()"))
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                failures.append((threading.current_thread().name, repr(e)))
                stop.set()
        return run

    def rcall(rid, op, args, fn, **kw):
        counts["calls"] += 1
        return rec.call(rid, op, args, fn, **kw)

    # ---------------------------------------------------------------- worker threads
    def worker(k):
        mine = rids[k::n_w]
        lrng = random.Random(seed * 31 + k)
        for inc in range(incarnations):
            for rid in mine:
                rcall(rid, "create_slot", (), lambda: w.create_slot(rid))
                live[rid] = inc
                for p in plans[rid, inc]:
                    if p.order == "T":
                        p.t_done.wait(0.05)
                    try:
                        rcall(rid, "enqueue", (p.u, p.mode),
                              lambda: w.enqueue(rid, p.u, p.kind, mode=MODES[p.mode]))
                    except SchedulerClosedError:
                        raise
                    except KvschedError:
                        pass  # a chaos thread removed the slot first (UnknownSlotError)
                    finally:
                        p.w_done.set()
                    if lrng.random() < 0.3:
                        try:
                            rcall(rid, "is_complete", (), lambda: w.is_complete(rid))
                        except SchedulerClosedError:
                            raise
                        except KvschedError:
                            pass
            for rid in mine:
                while True:
                    try:
                        if rcall(rid, "is_complete", (), lambda: w.is_complete(rid)):
                            rcall(rid, "slot_status", (), lambda: w.slot_status(rid))
                            rcall(rid, "remove_slot", (), lambda: w.remove_slot(rid))
                            break
                    except SchedulerClosedError:
                        raise
                    except KvschedError:
                        break  # removed by a chaos thread (UnknownSlotError)
                    if time.monotonic() > deadline or stop.is_set():
                        stuck.append(rid)
                        break
                    time.sleep(0.002)

    # ---------------------------------------------------------------- leader threads
    tq: queue.Queue = queue.Queue()
    order = list(all_plans)
    rng.shuffle(order)
    order.sort(key=lambda p: p.inc)  # a later incarnation's halves after the earlier ones
    for p in order:
        tq.put(p)

    def leader(k):
        lrng = random.Random(seed * 37 + k)
        while not stop.is_set():
            try:
                p = tq.get_nowait()
            except queue.Empty:
                return
            if p.inc and live.get(p.rid, -1) < p.inc:
                tq.put(p)          # its slot does not exist yet: later
                time.sleep(0.0005)
                continue
            if p.order == "W":
                p.w_done.wait(0.05)
            req = None
            if p.mode == "S" and lrng.random() < 0.5:
                with prog.lock:
                    it = prog.iteration
                it += lrng.randint(0, 1)
                req = (LayerComplete(lrng.randrange(LAYERS), it) if lrng.random() < 0.7
                       else IterationComplete(it))
            h = rcall(p.rid, "schedule", (p.u, p.mode),
                      lambda: t.schedule(p.rid, p.u, requirement=req, mode=MODES[p.mode]))
            p.t_done.set()
            exec_q.put((p, req, h))
            del h

    # ---------------------------------------------------------------- executors
    def executor(k):
        lrng = random.Random(seed * 41 + k)
        while True:
            try:
                item = exec_q.get(timeout=0.02)
            except queue.Empty:
                if producers_done.is_set() and exec_q.empty():
                    return
                continue
            p, req, h = item
            del item
            counts["waits"] += 1
            d = rcall(p.rid, "wait", (p.u,), lambda: h.wait(0.01), point="return_if_decided")
            if d is None:
                exec_q.put((p, req, h))
                del h
                continue
            if d.name == "CANCEL":
                ledger.end(p.u, "cancelled")
                del h
                continue
            if p.mode == "S":
                if not prog.satisfied(req):
                    raise AssertionError(f"{p.u} of {p.rid} EXECUTE before {req}; progress "
                                         f"{prog.iteration}/{prog.layers}/{prog.done}")
                ledger.start_running(max_inflight)
            if lrng.random() < 0.3:
                time.sleep(0)
            if p.mode == "S":
                ledger.stop_running()   # before the mark: the mark frees the token
            if p.fate == "drop":
                drop_q.put((p, h))
                del h
                continue
            outcome = "failed" if p.fate == "fail" else "completed"
            err = f"copy failed ({p.u})" if p.fate == "fail" else None
            was_closed = closed.is_set()
            rcall(p.rid, "mark", (p.u, outcome), lambda: h.mark_complete(error=err))
            counts["marks_after_close"] += was_closed   # S10: still counted after close
            ledger.end(p.u, outcome)
            counts["failed_marks"] += p.fate == "fail"
            if p.fate == "second":
                counts["second_marks"] += 1
                try:
                    rcall(p.rid, "second_mark", (p.u, "completed"), lambda: h.mark_complete())
                    raise AssertionError(f"second mark of {p.u} accepted")
                except ProtocolError:
                    pass
            del h

    def dropper():
        while True:
            item = drop_q.get()
            if item is None:       # every executor has ended
                return
            p, h = item
            del item
            t0 = time.perf_counter_ns() - rec.origin
            del h                      # the test's last reference: the handle dies here...
            gc.collect(0)
            s.stats()                  # (lets a lazily-detecting implementation notice it)
            # ...unless a chaos thread's poll() holds the same object for a moment (poll returns
            # the live handle object), and then the drop happens when that thread lets go. So
            # the drop takes effect at some point after t0: its interval is left open. That it
            # does take effect is checked by the slots completing (a dropped op ends as failed).
            rec._list().append(Event(t0, float("inf"), threading.current_thread().name, p.rid,
                                     "drop", (p.u,), None))
            ledger.end(p.u, "dropped")
            counts["dropped"] += 1

    # ---------------------------------------------------------------- progress
    def progress():
        lrng = random.Random(seed * 43)
        while not stop.is_set():
            with prog.lock:
                prog.iteration, prog.layers, prog.done = prog.iteration + 1, 0, False
                want = prog.iteration
            got = w.start_next_iteration()
            assert got == want, (got, want)
            if lrng.random() < 0.7:  # per-layer hooks; else only the iteration mark (S2)
                for layer in range(LAYERS):
                    with prog.lock:
                        prog.layers = layer + 1
                    w.mark_layer_complete(layer)
                    time.sleep(0.0003)
            with prog.lock:
                prog.done = True
            w.mark_iteration_complete()
            time.sleep(0.0005)

    # ---------------------------------------------------------------- chaos
    def chaos(k):
        lrng = random.Random(seed * 47 + k)
        while not stop.is_set():
            rid = lrng.choice(rids)
            if rid not in live:
                time.sleep(0.0002)
                continue
            r = lrng.random()
            try:
                if r < 0.04:
                    counts["cancel_slot"] += 1
                    rcall(rid, "cancel_slot", (), lambda: w.cancel_slot(rid))
                elif r < 0.06:
                    counts["remove_slot"] += 1
                    rcall(rid, "remove_slot", (), lambda: w.remove_slot(rid))
                elif r < 0.40:
                    rcall(rid, "is_complete", (), lambda: w.is_complete(rid))
                elif r < 0.70:
                    rcall(rid, "slot_status", (), lambda: w.slot_status(rid))
                elif r < 0.80:
                    counts["take_finished"] += 1
                    for got in w.take_finished():
                        assert got in rids, got
                elif r < 0.90:
                    counts["polls"] += 1
                    got = [h.uuid for h in t.poll(max_items=8, timeout=0)]  # keep no handle
                    with polled_lock:
                        for u in got:
                            assert u not in polled, f"poll returned {u} twice"
                            polled.add(u)
                else:
                    st = s.stats()
                    assert st["peak_inflight"] <= max_inflight, st
                    assert st["inflight"] <= max_inflight, st
                    assert st["removed_memory_size"] <= MEMORY, st
            except SchedulerClosedError:
                raise
            except KvschedError:
                pass  # recorded; the linearizability check judges it
            time.sleep(0.0002)

    # ---------------------------------------------------------------- close in the middle
    orphan_handles = [t.schedule(f"{impl}-orphan-{i}", uuid.uuid4()) for i in range(orphans)]

    def orphan_waiter(i):
        """Blocks with no timeout, in wait(), poll() or await, on what only close() ends (S10)."""
        h = orphan_handles[i]
        if i % 3 == 0:
            d = h.wait()
        elif i % 3 == 1:
            d = _poll_until_closed(t)
        else:
            d = asyncio.run(_await(h))
        woke.append((i, time.monotonic(), d))

    def close_now():
        closed.set()
        at = time.monotonic()
        rec.close(s.close)
        woke.append(("closed_at", at, None))
        stop.set()

    def closer():
        # mid-flight: once a third to two thirds of the transfer halves went out
        left = len(all_plans) * (1 - random.Random(seed).uniform(0.33, 0.66))
        while tq.qsize() > left and time.monotonic() < deadline:
            time.sleep(0.001)
        close_now()

    ths = [threading.Thread(daemon=True, target=guard(lambda k=k: worker(k)), name=f"W{k}") for k in range(n_w)]
    ths += [threading.Thread(daemon=True, target=guard(lambda k=k: leader(k)), name=f"T{k}") for k in range(n_t)]
    ths += [threading.Thread(daemon=True, target=guard(lambda k=k: executor(k)), name=f"E{k}")
            for k in range(n_e)]
    ths += [threading.Thread(daemon=True, target=guard(lambda k=k: chaos(k)), name=f"X{k}")
            for k in range(n_chaos)]
    ths += [threading.Thread(daemon=True, target=guard(dropper), name="D"),
            threading.Thread(daemon=True, target=guard(progress), name="P")]
    ths += [threading.Thread(daemon=True, target=guard(lambda i=i: orphan_waiter(i)), name=f"O{i}")
            for i in range(orphans)]
    if close_midway:
        ths.append(threading.Thread(daemon=True, target=guard(closer), name="C"))
    assert len(ths) == n_threads
    started = time.monotonic()
    for th in ths:
        th.start()
    barrier.wait(30)
    for th in ths[:n_w + n_t]:
        th.join(max(deadline - time.monotonic(), 0.1))
    assert not failures, failures
    if stuck and not closed.is_set():
        rid = stuck[0]
        try:
            status = w.slot_status(rid)
        except KvschedError as e:
            status = repr(e)
        evs = [e for e in rec.events() if e.rid == rid]
        raise AssertionError(
            f"slots never completed (S3: an operation waited for ever): {stuck[:5]}; {rid}: "
            f"{status}\n" + "\n".join(map(repr, evs[-40:])))
    if not close_midway:
        # what is left is transfer halves whose worker half was refused: close() decides them
        time.sleep(0.05)
        close_now()
    producers_done.set()
    for th in ths[n_w + n_t:n_w + n_t + n_e]:   # executors
        th.join(max(deadline - time.monotonic(), 0.1))
    drop_q.put(None)
    for th in ths:
        th.join(max(deadline - time.monotonic(), 0.1))
        assert not th.is_alive(), f"thread {th.name} hangs"
    wall = time.monotonic() - started
    assert not failures, failures
    s.close()  # idempotent

    # ---------------------------------------------------------------- checks
    closed_at = next(at for i, at, _ in woke if i == "closed_at")
    for i, at, d in woke:
        if i != "closed_at":
            assert at - closed_at < 1.0, f"orphan waiter {i} woke {at - closed_at:.2f} s after close"
            assert d is None or getattr(d, "name", None) == "CANCEL" or isinstance(d, list), d
    st = s.stats()
    assert st["peak_inflight"] <= max_inflight
    assert ledger.peak_running <= max_inflight
    # aggregate sums (B2): every end the executors caused is counted once, no more
    ends = collections.Counter(v[0] for v in ledger.terminal.values() if len(v) == 1)
    assert st["completed"] == ends["completed"], (st["completed"], ends)
    assert st["failed"] == ends["failed"] + ends["dropped"], (
        {k: v for k, v in st.items() if not k.startswith("dispatch")}, ends)
    assert st["dropped"] == ends["dropped"], (st["dropped"], ends)
    scheduled = {e.args[0] for e in rec.events() if e.op == "schedule" and not isinstance(e.result, tuple)}
    ledger.check_exactly_once([p.u for p in all_plans if p.u in scheduled])
    events = rec.events()
    glob = [e for e in events if e.rid is None]
    by_rid = {}
    for e in events:
        if e.rid is not None:
            by_rid.setdefault(e.rid, []).append(e)
    nodes = 0
    for rid, evs in by_rid.items():
        nodes += check_linearizable(evs + glob)
    figs = {"impl": impl, "threads": n_threads + 1, "requests": n_rids,
            "incarnations": incarnations, "operations": len(all_plans),
            "recorded_events": len(events), "wall_s": round(wall, 2), "search_nodes": nodes,
            "peak_inflight": st["peak_inflight"], "max_inflight": max_inflight,
            "executed": st["executed"], "close_midway": close_midway, "orphan_waiters": orphans,
            "cancelled_handles": sum(v == ["cancelled"] for v in ledger.terminal.values()),
            "seed": seed, **counts}
    for fate in ("ok", "fail", "second", "drop"):
        figs[f"planned_{fate}"] = sum(p.fate == fate for p in all_plans)
    return figs


async def _await(h):
    return await h


def _poll_until_closed(t):
    """poll() with no timeout until close(); keeps no handle (it may be handed a live handle of
    an executor, which would then outlive that executor's drop)."""
    try:
        while True:
            got = [h.uuid for h in t.poll(max_items=1, timeout=None)]
            if not got:
                return []   # woken by close()
    except SchedulerClosedError:
        return None


CASES = [
    # impl, requests, max_inflight, incarnations, close_midway, orphan waiters
    pytest.param("core", 160, 3, 1, False, 0, id="core-both-orders"),
    pytest.param("core", 60, 1, 3, False, 0, id="core-rid-reuse-1-token"),
    pytest.param("core", 120, 2, 1, True, 6, id="core-close-midway"),
    pytest.param("reference", 50, 2, 2, False, 0, id="reference-rid-reuse"),
]


@pytest.mark.parametrize("run", range(2))
@pytest.mark.parametrize("impl,n_rids,max_inflight,incarnations,close_midway,orphans", CASES)
def test_stress(impl, n_rids, max_inflight, incarnations, close_midway, orphans, run):
    """6 worker, 6 leader, 8 executor, 2 chaos, 1 dropper, 1 progress threads (+ orphan waiters
    and a closer), and the main thread; see the module docstring for what is checked. Two seeds
    per case."""
    cls = kvsched.Scheduler if impl == "core" else ReferenceScheduler
    seed = SEED + n_rids * 7 + max_inflight + 1000 * run
    print(f"seed={seed} (KVSCHED_STRESS={STRESS}; replay with KVSCHED_SEED={SEED})")
    figs = run_stress(cls, n_rids=n_rids * SCALE, max_inflight=max_inflight, seed=seed,
                      impl=impl, incarnations=incarnations, close_midway=close_midway,
                      orphans=orphans)
    write_report(f"concurrency_stress_{impl}_{n_rids}_{max_inflight}_{incarnations}"
                 f"{'_close' if close_midway else ''}_run{run}", figs)
