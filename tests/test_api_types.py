"""Types of the public API: Handle.outcome is an Outcome (a str enum equal to the old strings),
Scheduler.stats() is a plain dict with exactly the keys of SchedulerStats, the backends satisfy
the Backend protocol, TransferEngine.scheduler is deprecated."""

from __future__ import annotations

import inspect
import json
import typing
import uuid

import numpy as np
import pytest

import kvsched
from kvsched import Outcome, SchedulerStats, TransferKind
from kvsched.transfer.backend import Backend, StreamWaiter


def _one_op(s, rid="r", requirement=None):
    s.worker.create_slot(rid)
    u = uuid.uuid4()
    s.worker.enqueue(rid, u, TransferKind.LOAD)
    return s.transfer.schedule(rid, u, requirement=requirement)


@pytest.mark.parametrize("end", ["completed", "failed", "cancelled"])
def test_outcome_members_equal_the_strings(end):
    with kvsched.Scheduler() as s:
        h = _one_op(s, requirement=kvsched.IterationComplete(5) if end == "cancelled" else None)
        assert h.outcome is Outcome.OPEN and h.outcome == "open"
        if end == "cancelled":
            s.worker.cancel_slot("r")
        else:
            h.wait(1.0)
            h.mark_complete(error=None if end == "completed" else "boom")
        out = h.outcome
        assert isinstance(out, Outcome) and isinstance(out, str)
        assert out == end and out.value == end and Outcome(end) is out
        assert str(out) == end and f"{out}" == end and json.dumps(out) == f'"{end}"'
        assert hash(out) == hash(end) and {end: 1}[out] == 1


def test_outcome_is_exported():
    assert "Outcome" in kvsched.__all__ and kvsched.Outcome is Outcome
    assert [o.value for o in Outcome] == ["open", "completed", "failed", "cancelled"]


def test_stats_is_a_dict_with_the_typed_keys():
    hints = typing.get_type_hints(SchedulerStats)
    with kvsched.Scheduler() as s:
        h = _one_op(s)
        h.wait(1.0)
        h.mark_complete()
        st = s.stats()
    assert type(st) is dict
    assert set(st) == set(hints)
    for key, value in st.items():
        assert type(value) is hints[key], (key, value)
        assert (hints[key] is float) == key.endswith("_us"), key
    assert st["completed"] == 1 and st["executed"] == 1


def test_every_stats_key_is_documented():
    source = inspect.getsource(SchedulerStats)
    for key in typing.get_type_hints(SchedulerStats):
        line = next(i for i, text in enumerate(source.splitlines()) if text.strip().startswith(f"{key}:"))
        assert source.splitlines()[line - 1].strip().startswith("#:"), key


def test_backends_satisfy_the_protocol():
    from kvsched.transfer.cuda import CudaBackend
    from kvsched.transfer.host import HostBackend

    wanted = {name for name, _ in inspect.getmembers(Backend) if not name.startswith("_")}
    assert wanted == {"pending", "submit", "wait_idle", "close", "abandon"}
    for cls in (HostBackend, CudaBackend):
        assert wanted <= set(dir(cls)), (cls, wanted - set(dir(cls)))
    assert {"wait_on", "event_of"} <= set(dir(CudaBackend))
    assert {n for n, _ in inspect.getmembers(StreamWaiter) if not n.startswith("_")} == {"wait_on", "event_of"}


def test_host_job_state_is_attached(tmp_path):
    with kvsched.Scheduler() as s, kvsched.TransferEngine(s, backend="host", workers=1) as eng:
        src = kvsched.BlockPool.from_array(np.arange(2 * 4 * 8, dtype=np.uint8).reshape(2, 4, 8))
        dst = kvsched.BlockPool.from_array(np.zeros((2, 4, 8), dtype=np.uint8))
        h = _one_op(s)
        h.wait(1.0)
        job = eng.submit(h, src=src, dst=dst, pairs=[[0, 1]])
        assert job.wait(5.0) and job.ok
        assert job.backend_state is not None  # the host backend's record
        assert h.outcome is Outcome.COMPLETED
        assert src.transfer_cache.plan_pairs and dst.transfer_cache.host_views


def test_engine_scheduler_attribute_is_deprecated():
    with kvsched.Scheduler() as s, kvsched.TransferEngine(s, backend="host", workers=1) as eng:
        with pytest.warns(DeprecationWarning, match="TransferEngine.scheduler"):
            assert eng.scheduler is s


def test_typed_options_are_the_keyword_options():
    from kvsched import CudaOptions, HostOptions

    with kvsched.Scheduler() as s:
        with kvsched.TransferEngine(s, backend="host", host=HostOptions(workers=3, split_bytes=1 << 20)) as a:
            assert a._host.workers == 3 and a._host.split_bytes == 1 << 20
        with kvsched.TransferEngine(s, backend="host", workers=3, split_bytes=1 << 20) as b:
            assert b._host.workers == 3 and b._host.split_bytes == 1 << 20
        with kvsched.TransferEngine(s, backend="host", host=HostOptions()) as c:
            assert c._host.event_timeout == 60.0 and c._host.split_bytes == 8 << 20
        with kvsched.TransferEngine(s, backend="host", cuda=CudaOptions(max_stream_ops=8)) as d:
            assert d.backend == "host"  # cuda options of a host engine are unused, as keywords are
        with pytest.raises(TypeError, match="workers given both"):
            kvsched.TransferEngine(s, backend="host", host=HostOptions(workers=2), workers=2)
        with pytest.raises(TypeError, match="HostOptions"):
            kvsched.TransferEngine(s, backend="host", host={"workers": 2})
        with pytest.raises(kvsched.InvalidArgumentError, match="workers"):
            kvsched.TransferEngine(s, backend="host", host=HostOptions(workers=0))


@pytest.mark.parametrize("value", [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1), uuid.uuid4(), uuid.uuid1()])
def test_handle_uuid_is_the_uuid_it_was_made_with(value):
    # The core builds handle uuids without calling UUID.__init__: the object must still be an
    # ordinary uuid.UUID in every way a caller can see.
    import copy
    import pickle

    with kvsched.Scheduler() as s:
        s.worker.create_slot("r")
        s.worker.enqueue("r", value, TransferKind.LOAD)
        h = s.transfer.schedule("r", value)
        got = h.uuid
        assert type(got) is uuid.UUID
        assert got == value and hash(got) == hash(value) and got.int == value.int
        assert str(got) == str(value) and repr(got) == repr(value) and got.bytes == value.bytes
        assert got.version == value.version and got.is_safe is uuid.SafeUUID.unknown
        assert pickle.loads(pickle.dumps(got)) == value and copy.deepcopy(got) == value
        with pytest.raises(TypeError, match="immutable"):
            got.int = 1
        assert {got: 1}[value] == 1
        h.mark_complete()
