"""Fork: a child inherits schedulers and engines it cannot use (docs/semantics.md "Fork").

Each case forks, runs a body in the child and reports through the exit status; the parent waits
with a deadline and kills a child that hangs, so a hang fails the test instead of CI.
"""

import os
import signal
import sys
import time
import uuid

import numpy as np
import pytest

import kvsched
from kvsched import BlockPool, Scheduler, SchedulerForkedError, TransferEngine

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

OK, WRONG = 0, 3


def run_in_child(body, deadline_s=20.0):
    """Run body() in a forked child; returns its exit code (-9 when it hung and was killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = WRONG
        try:
            code = body()
        except BaseException as exc:  # noqa: BLE001 - reported through the exit code
            os.write(2, f"child failed: {type(exc).__name__}: {exc}\n".encode())
            code = 4
        finally:
            os._exit(code)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -9


def scheduler_with_pending_op(**kw):
    s = Scheduler(op_timeout=30.0, **kw)
    s.worker.create_slot("r")
    s.worker.enqueue("r", uuid.uuid4(), kvsched.TransferKind.LOAD)  # waits for its transfer half
    return s


def test_child_drops_inherited_scheduler_without_hanging():
    s = scheduler_with_pending_op()

    def body():
        nonlocal s
        del s  # the destructor must not touch the parent's deadline thread or locks
        import gc

        gc.collect()
        return OK

    assert run_in_child(body) == OK
    # The parent's scheduler is unaffected.
    assert s.stats()["enqueued"] == 1
    s.close()


def test_child_exit_with_inherited_scheduler_and_handles():
    s = scheduler_with_pending_op()
    u = uuid.uuid4()
    s.worker.enqueue("r", u, kvsched.TransferKind.STORE)
    h = s.transfer.schedule("r", u)  # decided EXECUTE: a handle the child inherits
    assert h.wait(1.0) == kvsched.Decision.EXECUTE

    def body():
        return OK  # interpreter-style exit with the objects alive: no hang at teardown

    assert run_in_child(body) == OK
    # In the parent the handle is still ours and marks normally.
    h.mark_complete()
    s.close()


def test_every_call_in_the_child_says_fork():
    s = scheduler_with_pending_op()
    u = uuid.uuid4()
    s.worker.enqueue("r", u, kvsched.TransferKind.STORE)
    h = s.transfer.schedule("r", u)
    assert h.wait(1.0) == kvsched.Decision.EXECUTE
    w, t = s.worker, s.transfer
    calls = [
        lambda: w.create_slot("x"),
        lambda: w.enqueue("r", uuid.uuid4(), 0),
        lambda: w.enqueue_many("r", [uuid.uuid4()], 0),
        lambda: w.start_next_iteration(),
        lambda: w.mark_layer_complete(0),
        lambda: w.mark_iteration_complete(),
        lambda: w.is_complete("r"),
        lambda: w.take_finished(),
        lambda: w.slot_status("r"),
        lambda: w.cancel_slot("r"),
        lambda: w.remove_slot("r"),
        lambda: t.schedule("r", uuid.uuid4()),
        lambda: t.schedule_many("r", [uuid.uuid4()]),
        lambda: t.poll(1, 0.0),
        lambda: h.wait(0.1),
        lambda: h.decision,
        lambda: h.mark_complete(),
        lambda: s.stats(),
    ]

    def body():
        for i, call in enumerate(calls):
            try:
                call()
            except SchedulerForkedError as exc:
                if "fork" not in str(exc):
                    return 10 + i
            else:
                return 40 + i
        if not (s.closed and s.inherited):
            return 80
        s.close()  # a no-op in the child: no raise, no hang
        return OK

    assert run_in_child(body) == OK
    assert not s.inherited and not s.closed
    h.mark_complete()
    assert s.worker.slot_status("r").completed == 1
    s.close()


def test_inherited_op_timeout_does_not_fire_silently_in_the_child():
    # The parent's deadline thread is not in the child: the child must not keep using a copy whose
    # timeouts never fire. It is told so at once.
    s = Scheduler(op_timeout=0.05)
    s.worker.create_slot("r")

    def body():
        try:
            s.transfer.schedule("r", uuid.uuid4())
        except SchedulerForkedError:
            return OK
        return WRONG

    assert run_in_child(body) == OK
    s.close()


def test_new_scheduler_and_engine_work_in_the_child():
    parent = scheduler_with_pending_op()
    parent_engine = TransferEngine(parent, backend="host")

    def body():
        with Scheduler(op_timeout=5.0) as s2, TransferEngine(s2, backend="host") as e2:
            a = np.arange(2 * 4 * 8, dtype=np.uint8).reshape(2, 4, 8)
            b = np.zeros_like(a)
            s2.worker.create_slot("c")
            u = uuid.uuid4()
            s2.worker.enqueue("c", u, kvsched.TransferKind.STORE)
            h = s2.transfer.schedule("c", u)
            assert h.wait(1.0) == kvsched.Decision.EXECUTE
            job = e2.submit(h, BlockPool.from_array(a), BlockPool.from_array(b), pairs=[(1, 2)])
            assert job.wait(5.0) and job.ok
            assert np.array_equal(b[:, 2], a[:, 1])
            assert s2.worker.is_complete("c")
        return OK

    assert run_in_child(body) == OK
    parent_engine.close()
    parent.close()


def test_inherited_engine_refuses_submit_and_closes_at_once():
    s = Scheduler()
    eng = TransferEngine(s, backend="host", workers=2)
    a = np.ones((1, 4, 8), dtype=np.uint8)
    b = np.zeros_like(a)
    pa, pb = BlockPool.from_array(a), BlockPool.from_array(b)
    s.worker.create_slot("r")
    u = uuid.uuid4()
    s.worker.enqueue("r", u, kvsched.TransferKind.STORE)
    h = s.transfer.schedule("r", u)
    assert h.wait(1.0) == kvsched.Decision.EXECUTE

    def body():
        if not eng.inherited:
            return 20
        for call in (
            lambda: eng.submit(h, pa, pb, pairs=[(0, 0)]),
            lambda: eng.stats(),
            lambda: eng.wait_idle(0.1),
            lambda: eng.pending,
        ):
            try:
                call()
            except SchedulerForkedError as exc:
                if "fork" not in str(exc):
                    return 21
            else:
                return 22
        t0 = time.monotonic()
        if eng.close() is not True or time.monotonic() - t0 > 1.0:
            return 23
        if b.any():
            return 24  # nothing copied
        return OK

    assert run_in_child(body) == OK
    # The parent's engine still works.
    job = eng.submit(h, pa, pb, pairs=[(0, 0)])
    assert job.wait(5.0) and job.ok
    assert eng.close(5.0)
    s.close()
