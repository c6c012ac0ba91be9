"""Regression tests of robustness round 2: each case broke before its fix (docs/reliability.md)."""

import gc
import threading
import uuid

import numpy as np
import pytest

import kvsched
from kvsched import (
    BlockPool,
    Decision,
    DuplicateOperationError,
    InvalidArgumentError,
    LayerComplete,
    ProtocolError,
    RequestMode,
    Scheduler,
    TransferEngine,
    TransferKind,
)

LOAD, STORE = TransferKind.LOAD, TransferKind.STORE


@pytest.fixture
def s():
    with Scheduler() as sched:
        yield sched


def decided(s, rid="r", kind=STORE):
    try:
        s.worker.create_slot(rid)
    except kvsched.SlotExistsError:
        pass
    u = uuid.uuid4()
    s.worker.enqueue(rid, u, kind)
    h = s.transfer.schedule(rid, u)
    assert h.wait(1.0) == Decision.EXECUTE
    return h


@pytest.fixture
def pools():
    a = np.arange(2 * 8 * 16, dtype=np.uint8).reshape(2, 8, 16)
    b = np.zeros_like(a)
    return a, b, BlockPool.from_array(a), BlockPool.from_array(b)


# -- 2. an ended handle never copies again -------------------------------------------------------


def test_resubmitting_a_completed_handle_copies_nothing(s, pools):
    a, b, pa, pb = pools
    with TransferEngine(s, backend="host") as eng:
        h = decided(s)
        assert eng.submit(h, pa, pb, pairs=[(0, 1)]).wait(5.0)
        assert h.outcome == "completed"
        b[:] = 0
        before = eng.stats()["submitted"]
        with pytest.raises(ProtocolError, match="nothing copied"):
            eng.submit(h, pa, pb, pairs=[(0, 1)])
        assert eng.wait_idle(5.0)
        assert not b.any()
        assert eng.stats()["submitted"] == before


def test_submitting_a_handle_the_caller_marked_copies_nothing(s, pools):
    a, b, pa, pb = pools
    with TransferEngine(s, backend="host") as eng:
        h = decided(s)
        h.mark_complete(error="gave up")
        with pytest.raises(ProtocolError, match="marked"):
            eng.submit(h, pa, pb, pairs=[(0, 1)])
        assert eng.wait_idle(5.0) and not b.any()


def test_the_caller_cannot_mark_a_handle_an_engine_copies(s, pools):
    a, b, pa, pb = pools
    gate = threading.Event()
    with TransferEngine(s, backend="host", fault_hook=lambda job: gate.wait(5.0)) as eng:
        h = decided(s)
        job = eng.submit(h, pa, pb, pairs=[(0, 1)])
        with pytest.raises(ProtocolError, match="TransferEngine is copying"):
            h.mark_complete()
        with pytest.raises(ProtocolError, match="already submitted"):
            TransferEngine(s, backend="host").submit(h, pa, pb, pairs=[(0, 2)])
        gate.set()
        assert job.wait(5.0) and job.ok
        assert h.outcome == "completed"
        assert np.array_equal(b[:, 1], a[:, 0]) and not b[:, 2].any()
        with pytest.raises(ProtocolError):
            h.mark_complete()


def test_with_block_around_submit_lets_the_engine_mark(s, pools):
    a, b, pa, pb = pools
    with TransferEngine(s, backend="host") as eng:
        h = decided(s)
        with h:
            job = eng.submit(h, pa, pb, pairs=[(0, 1)])
        assert job.wait(5.0) and h.outcome == "completed"
        assert s.worker.slot_status("r").completed == 1


def test_a_refused_submit_leaves_the_handle_to_the_caller(s, pools):
    a, b, pa, pb = pools
    with TransferEngine(s, backend="host") as eng:
        h = decided(s)
        with pytest.raises(InvalidArgumentError):
            eng.submit(h, pa, pb, pairs=[(0, 99)])
        h.mark_complete()  # still the caller's to mark
        assert h.outcome == "completed"


# -- 3. bounded memory for transfer halves whose request never gets a slot -----------------------


def test_timed_out_halves_without_a_slot_are_bounded():
    with Scheduler(op_timeout=0.01, removed_memory=50) as s:
        for i in range(300):
            s.transfer.schedule(f"ghost-{i % 7}", uuid.uuid4())
        deadline = 5.0
        import time

        end = time.monotonic() + deadline
        while time.monotonic() < end and s.stats()["timed_out"] < 300:
            time.sleep(0.01)
        s.transfer.poll(1000, 0.0)  # drain the CANCEL decisions
        st = s.stats()
        assert st["timed_out"] == 300
        assert st["pending_transfer_halves"] == 0
        assert st["held_cancels"] <= 50
        assert st["held_forgotten"] >= 250


def test_cancel_slot_of_an_unseen_request_is_bounded():
    with Scheduler(removed_memory=40) as s:
        for i in range(200):
            rid = f"never-seen-{i}"
            s.transfer.schedule(rid, uuid.uuid4())
            s.worker.cancel_slot(rid)
        st = s.stats()
        assert st["pending_transfer_halves"] == 0
        assert st["held_cancels"] <= 40
        assert st["held_forgotten"] == 160


def test_a_late_worker_half_still_joins_a_held_timed_out_half():
    import time

    with Scheduler(op_timeout=0.02) as s:
        u = uuid.uuid4()
        h = s.transfer.schedule("late", u)
        assert h.wait(2.0) == Decision.CANCEL
        s.worker.create_slot("late")
        s.worker.enqueue("late", u, LOAD)
        st = s.worker.slot_status("late")
        assert st.cancelled == 1 and s.worker.is_complete("late")
        assert "timed out" in st.errors[0][1]
        del time


# -- 4. durations ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e10, 1e30, float("inf"), float("nan"), -1.0, 10**400])
def test_store_starvation_out_of_range_is_refused(value):
    with pytest.raises(InvalidArgumentError, match="store_starvation_s"):
        Scheduler(store_starvation_s=value)


@pytest.mark.parametrize("value", [1e-10, 0.0, -1.0, 9.2e9, 1e300, float("inf"), float("nan")])
def test_op_timeout_out_of_range_is_refused(value):
    with pytest.raises(InvalidArgumentError, match="op_timeout"):
        Scheduler(op_timeout=value)


def test_one_nanosecond_op_timeout_is_honoured():
    with Scheduler(op_timeout=1e-9) as s:
        h = s.transfer.schedule("r", uuid.uuid4())
        assert h.wait(2.0) == Decision.CANCEL
        assert s.stats()["timed_out"] == 1


def test_largest_op_timeout_does_not_fire():
    with Scheduler(op_timeout=1e9) as s:
        h = s.transfer.schedule("r", uuid.uuid4())
        assert h.wait(0.05) is None
        assert s.stats()["timed_out"] == 0


def test_wait_timeouts(s):
    h = s.transfer.schedule("r", uuid.uuid4())
    for bad in (10**400, 1e10, -1, float("nan")):
        with pytest.raises(InvalidArgumentError, match="timeout"):
            h.wait(bad)
    assert h.wait(np.float32(0.001)) is None
    assert h.wait(np.int64(0)) is None
    with pytest.raises(TypeError, match="timeout"):
        h.wait("1")
    with pytest.raises(InvalidArgumentError, match="timeout"):
        s.transfer.poll(1, 1e12)


def test_inf_timeout_waits_until_decided(s):
    s.worker.create_slot("r")
    u = uuid.uuid4()
    h = s.transfer.schedule("r", u)
    threading.Timer(0.05, lambda: s.worker.enqueue("r", u, LOAD)).start()
    assert h.wait(float("inf")) == Decision.EXECUTE
    h.mark_complete()


# -- 5. batches are all or nothing -------------------------------------------------------------


def test_enqueue_many_with_a_duplicate_changes_nothing(s):
    s.worker.create_slot("r")
    old = uuid.uuid4()
    s.worker.enqueue("r", old, LOAD)
    fresh = [uuid.uuid4() for _ in range(5)]
    for batch in (fresh + [old], fresh + [fresh[0]]):
        with pytest.raises(DuplicateOperationError):
            s.worker.enqueue_many("r", batch, LOAD)
        assert s.worker.slot_status("r").expected == 1
        assert s.stats()["enqueued"] == 1
    s.worker.enqueue_many("r", fresh, LOAD)  # nothing of the refused calls stuck
    assert s.worker.slot_status("r").expected == 6


def test_schedule_many_with_a_duplicate_changes_nothing(s):
    s.worker.create_slot("r")
    us = [uuid.uuid4() for _ in range(4)]
    for u in us:
        s.worker.enqueue("r", u, STORE)
    taken = uuid.uuid4()
    s.transfer.schedule("other", taken)
    with pytest.raises(DuplicateOperationError):
        s.transfer.schedule_many("r", us + [taken])
    with pytest.raises(DuplicateOperationError, match="twice"):
        s.transfer.schedule_many("r", us + [us[1]])
    st = s.stats()
    assert st["scheduled"] == 1 and st["executed"] == 0
    hs = s.transfer.schedule_many("r", us)
    assert [h.wait(1.0) for h in hs] == [Decision.EXECUTE] * 4
    for h in hs:
        h.mark_complete()


def test_batches_and_singles_race_without_deadlock_or_partial_batches():
    with Scheduler(max_inflight=10_000) as s:
        s.worker.create_slot("r")
        pool = [uuid.uuid4() for _ in range(400)]
        results = []

        def worker(seed):
            rng = np.random.default_rng(seed)
            for _ in range(200):
                batch = [pool[i] for i in rng.choice(len(pool), 5, replace=False)]
                try:
                    s.worker.enqueue_many("r", batch, LOAD)
                    results.append(("ok", batch))
                except DuplicateOperationError:
                    results.append(("dup", batch))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
        applied = [u for r, b in results if r == "ok" for u in b]
        assert len(applied) == len(set(applied))  # every uuid at most once, whole batches only
        assert s.worker.slot_status("r").expected == len(applied)


# -- 6 and 8. enums and numpy integers ---------------------------------------------------------


@pytest.mark.parametrize(
    "kind, mode",
    [(Decision.EXECUTE, RequestMode.SCHEDULED), (RequestMode.IMMEDIATE, RequestMode.SCHEDULED),
     (LOAD, Decision.EXECUTE), (LOAD, TransferKind.STORE)],
)
def test_members_of_other_enums_are_type_errors(s, kind, mode):
    s.worker.create_slot("r")
    with pytest.raises(TypeError, match="must be a"):
        s.worker.enqueue("r", uuid.uuid4(), kind, mode)
    assert s.stats()["enqueued"] == 0
    with pytest.raises(TypeError, match="RequestMode"):
        s.transfer.schedule("r", uuid.uuid4(), mode=Decision.CANCEL)


def test_numpy_integers_are_accepted_everywhere(s):
    w, t = s.worker, s.transfer
    w.create_slot("r")
    u = uuid.uuid4()
    w.enqueue("r", u, np.int64(1), np.uint8(0))
    it = w.start_next_iteration()
    h = t.schedule("r", u, requirement=LayerComplete(np.int64(1), np.int32(it)))
    w.mark_layer_complete(np.int64(0))
    assert h.decision is None
    w.mark_layer_complete(np.int16(1))
    assert [x.request_id for x in t.poll(np.int64(8), np.float64(1.0))] == ["r"]
    h.mark_complete()
    with Scheduler(max_inflight=np.int64(3), num_layers=np.int32(4), poll_backlog=np.uint16(9)) as s2:
        assert s2.max_inflight == 3


@pytest.mark.parametrize("bad", [2**63, 2**64, 10**400, -(2**63) - 1])
def test_huge_integers_name_the_argument_and_range(s, bad):
    with pytest.raises(InvalidArgumentError, match=r"layer .*range"):
        s.worker.mark_layer_complete(bad)
    with pytest.raises(InvalidArgumentError, match="max_inflight must be in"):
        Scheduler(max_inflight=bad)


# -- 7. a read-only destination --------------------------------------------------------------


def test_destination_made_read_only_after_the_pool_is_refused(s, pools):
    a, b, pa, pb = pools
    b.flags.writeable = False
    with TransferEngine(s, backend="host") as eng:
        h = decided(s)
        with pytest.raises(InvalidArgumentError, match="read-only"):
            eng.submit(h, pa, pb, pairs=[(0, 1)])
        h.mark_complete()
    b.flags.writeable = True
    assert not b.any()


# -- 10. clear errors --------------------------------------------------------------------------


def test_zero_size_blocks_say_so():
    with pytest.raises(InvalidArgumentError, match="zero bytes"):
        BlockPool.from_array(np.zeros((2, 4, 0), dtype=np.uint8))


def test_pairs_and_layers_errors_name_the_problem(s, pools):
    a, b, pa, pb = pools
    with TransferEngine(s, backend="host") as eng:
        h = decided(s)
        with pytest.raises(InvalidArgumentError, match="out of range"):
            eng.submit(h, pa, pb, pairs=[(2**63, 0)])
        with pytest.raises(TypeError, match="layers must be"):
            eng.submit(h, pa, pb, pairs=[(0, 0)], layers=1.0)
        h.mark_complete()


def test_a_huge_request_id_is_cut_in_messages(s):
    rid = "x" * 10_000_000
    with pytest.raises(kvsched.UnknownSlotError) as info:
        s.worker.enqueue(rid, uuid.uuid4(), LOAD)
    assert len(str(info.value)) < 1000 and "more bytes" in str(info.value)


def test_calls_without_a_request_do_not_name_one(s):
    s.close()
    for call in (s.worker.start_next_iteration, s.worker.take_finished):
        with pytest.raises(kvsched.SchedulerClosedError) as info:
            call()
        assert "request" not in str(info.value)


def test_every_uuid_form_uuid_module_accepts(s):
    s.worker.create_slot("r")
    u = uuid.uuid4()
    s.worker.enqueue("r", f"urn:uuid:{u}", LOAD)
    h = s.transfer.schedule("r", "{" + str(u).upper() + "}")
    assert h.uuid == u and h.wait(1.0) == Decision.EXECUTE
    h.mark_complete()
    # every form uuid.UUID() takes names the same operation; what it refuses is refused
    for form in (str(u), u.hex, f"urn:uuid:{u.hex}", "{" + u.hex + "}"):
        assert uuid.UUID(form) == u
        with pytest.raises(DuplicateOperationError):
            s.worker.enqueue("r", form, LOAD)
    for bad in ("not-a-uuid", str(u)[:-1], f"urn:uuid:{u}x"):
        with pytest.raises(ValueError):
            uuid.UUID(bad)
        with pytest.raises(InvalidArgumentError, match="malformed uuid"):
            s.worker.enqueue("r", bad, LOAD)


def test_huge_error_texts_are_bounded_in_slot_status(s):
    h = decided(s)
    h.mark_complete(error="e" * 50_000_000)
    (_, message), = s.worker.slot_status("r").errors
    assert len(message) < 5000 and "more bytes" in message
    del h
    gc.collect()
