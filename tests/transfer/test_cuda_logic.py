"""The cuda backend's logic, run on a CPU-only machine against a fake CUDA runtime
(fake_cudart.py): launching, coalescing and batching, event waits on the right stream,
completion by one reaper thread, error codes reaching the handle, backpressure, cleanup.

GPU-side ordering itself (that a copy stream really waits) needs a GPU: test_cuda_backend.py."""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest
from fake_cudart import FakeRuntime, cudaError_t
from transfer_helpers import random_pairs

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool
from kvsched.transfer.cudart import DeviceBuffer, as_event_handle, as_stream_handle, cuda_available, pinned_empty
from kvsched.transfer.engine import TransferEngine
from kvsched.transfer.errors import CudaError, TransferQueueFullError

pytestmark = pytest.mark.timeout(120)


def _device_pool(rt, layers, n, block_bytes, device=0):
    buf = DeviceBuffer((layers, n, block_bytes), device=device, runtime=rt)
    return buf, BlockPool.from_array(buf)


def _read(buf: DeviceBuffer) -> np.ndarray:
    """The fake's device memory is host memory: read it directly."""
    import ctypes

    raw = (ctypes.c_ubyte * buf.nbytes).from_address(buf.ptr)
    return np.frombuffer(raw, dtype=np.uint8).reshape(buf.shape).copy()


def test_detection_uses_the_runtime(fake):
    ok, reason = cuda_available(fake)
    assert ok and "1 CUDA device" in reason
    broken = FakeRuntime(num_devices=0)
    assert cuda_available(broken) == (False, "no CUDA device")
    broken.fail("cudaGetDeviceCount", cudaError_t.cudaErrorInsufficientDriver)
    ok, reason = cuda_available(broken)
    assert not ok and "cudaErrorInsufficientDriver" in reason


def test_auto_picks_cuda_when_a_device_is_usable(cuda_engine, fake):
    eng = TransferEngine(None, runtime=fake)
    try:
        assert eng.backend == "cuda" and "CUDA device" in eng.backend_reason
    finally:
        eng.close()


@pytest.mark.parametrize("batch", [True, False])
def test_round_trip_scattered_blocks(cuda_engine, fake, make_handle, rng, batch):
    layers, n, bb = 3, 64, 256
    eng = cuda_engine(batch=batch, batch_chunk=16)
    assert eng.batched is batch
    host = pinned_empty((layers, n, bb), runtime=fake)
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    back = np.zeros_like(host)
    dev_buf, dev = _device_pool(fake, layers, n, bb)
    load_pairs = random_pairs(rng, n, n, 40)
    h1 = make_handle()
    load = eng.submit(h1, BlockPool.from_array(host), dev, load_pairs)
    assert load.kind == "h2d" and load.wait(10) and h1.completed
    dev_now = _read(dev_buf)
    np.testing.assert_array_equal(dev_now[:, load_pairs[:, 1]], host[:, load_pairs[:, 0]])
    store_pairs = np.stack([load_pairs[:, 1], np.arange(40)], axis=1)
    h2 = make_handle()
    store = eng.submit(h2, dev, BlockPool.from_array(back), store_pairs)
    assert store.kind == "d2h" and store.wait(10) and h2.completed
    np.testing.assert_array_equal(back[:, :40], host[:, load_pairs[:, 0]])
    assert not back[:, 40:].any()
    if batch:
        assert fake.batches and max(fake.batches) <= 16
        assert fake.calls["cudaMemcpyAsync"] == 0
    else:
        assert not fake.batches and fake.calls["cudaMemcpyAsync"] == load.num_copies + store.num_copies


def test_runs_coalesce_into_one_copy_per_layer_and_piece(cuda_engine, fake, make_handle):
    eng = cuda_engine(batch=False)
    host = np.arange(2 * 2 * 32 * 16, dtype=np.uint8).reshape(2, 2, 32, 16)  # (layers, K/V, blocks, bytes)
    buf = DeviceBuffer((2, 2, 32, 16), runtime=fake)
    pairs = [[i, i + 8] for i in range(10)]  # one run of 10 blocks
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(host, block_dim=2), BlockPool.from_array(buf, block_dim=2), pairs)
    assert job.wait(10) and h.completed
    assert job.num_copies == 2 * 2 == fake.calls["cudaMemcpyAsync"]
    assert all(size == 10 * 16 for _, _, size in fake.copies)
    np.testing.assert_array_equal(_read(buf)[:, :, 8:18], host[:, :, 0:10])


def test_d2d_and_h2h_on_a_cuda_engine(cuda_engine, fake, make_handle, rng):
    eng = cuda_engine()
    a_buf, a = _device_pool(fake, 1, 8, 32)
    b_buf, b = _device_pool(fake, 1, 8, 32)
    host = pinned_empty((1, 8, 32), runtime=fake)
    host[:] = 9
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), a, [[0, 0], [1, 1]]).wait(10)
    h = make_handle()
    job = eng.submit(h, a, b, [[0, 5], [1, 6]])
    assert job.kind == "d2d" and job.wait(10) and h.completed
    assert (_read(b_buf)[0, 5:7] == 9).all()
    x, y = np.ones((1, 4, 8), np.uint8), np.zeros((1, 4, 8), np.uint8)
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(x), BlockPool.from_array(y), [[0, 3]])
    assert job.kind == "h2h" and job.wait(10) and h.completed and (y[0, 3] == 1).all()


def test_pageable_host_pool_is_registered_once(cuda_engine, fake, make_handle):
    eng = cuda_engine()
    host = np.zeros((2, 16, 64), np.uint8)
    pool = BlockPool.from_array(host)
    _, dev = _device_pool(fake, 2, 16, 64)
    for i in range(3):
        h = make_handle()
        assert eng.submit(h, dev, pool, [[i, i]]).wait(10) and h.completed
    assert fake.calls["cudaHostRegister"] == 1
    pinned = BlockPool.from_array(pinned_empty((2, 16, 64), runtime=fake))
    h = make_handle()
    assert eng.submit(h, dev, pinned, [[0, 0]]).wait(10)
    assert fake.calls["cudaHostRegister"] == 1  # already page-locked: not registered again
    del pool
    import gc

    gc.collect()
    assert fake.calls["cudaHostUnregister"] == 1  # registration lives as long as the pool


def test_events_are_waited_on_the_copy_stream_before_copying(cuda_engine, fake, make_handle):
    eng = cuda_engine()
    host = pinned_empty((1, 8, 32), runtime=fake)
    _, dev = _device_pool(fake, 1, 8, 32)
    compute_ev = types.SimpleNamespace(cuda_event=0xABC0)  # like a recorded torch.cuda.Event
    h = make_handle()
    fake.trace.clear()  # the batch self-test's copies
    store = eng.submit(h, dev, BlockPool.from_array(host), [[1, 1]], compute_event=compute_ev)
    d2h = eng.stream("d2h")
    assert (d2h, 0xABC0) in fake.waits
    trace = [entry for entry in fake.trace if entry[1] == d2h]
    assert trace[:3] == [("wait", d2h), ("copy", d2h), ("record", d2h)]
    h2 = make_handle()
    fake.trace.clear()
    load = eng.submit(h2, BlockPool.from_array(host), dev, [[2, 2]], wait_event=[0xDEF0, 0xDEF8])
    h2d = eng.stream("h2d")
    assert [(s, e) for s, e in fake.waits[-2:]] == [(h2d, 0xDEF0), (h2d, 0xDEF8)]
    assert [k for k, _ in fake.trace] == ["wait", "wait", "copy", "record"]
    assert store.wait(10) and load.wait(10) and h.completed and h2.completed
    with pytest.raises(InvalidArgumentError, match="record it"):
        eng.submit(make_handle(), dev, BlockPool.from_array(host), [[1, 1]], compute_event=types.SimpleNamespace(cuda_event=0))


def test_compute_stream_can_wait_on_a_load(cuda_engine, fake, make_handle):
    fake.not_ready_polls = 10**9  # keep the job in flight
    eng = cuda_engine()
    host = pinned_empty((1, 8, 32), runtime=fake)
    _, dev = _device_pool(fake, 1, 8, 32)
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(host), dev, [[0, 0]])
    event = job.event
    assert event is not None
    job.wait_on(types.SimpleNamespace(cuda_stream=0x5550))  # a torch.cuda.Stream
    assert fake.waits[-1] == (0x5550, event)
    fake.not_ready_polls = 0
    with fake._lock:
        fake.events[event] = 0
    assert job.wait(10) and h.completed
    n = len(fake.waits)
    job.wait_on(0x5550)  # completed: nothing left to wait for
    assert len(fake.waits) == n and job.event is None


def test_launch_error_fails_the_handle_with_the_error_name(cuda_engine, fake, make_handle):
    eng = cuda_engine(batch=False)
    host = pinned_empty((1, 8, 32), runtime=fake)
    _, dev = _device_pool(fake, 1, 8, 32)
    fake.fail("cudaMemcpyAsync", cudaError_t.cudaErrorInvalidValue)
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(host), dev, [[0, 0], [2, 2]])  # does not raise
    assert job.wait(10) and h.failed
    assert "cudaMemcpyAsync failed: cudaErrorInvalidValue" in h.error_text
    assert fake.calls["cudaEventRecord"] >= 1  # failure reported after the stream drained
    h2 = make_handle()
    assert eng.submit(h2, BlockPool.from_array(host), dev, [[1, 1]]).wait(10) and h2.completed


def test_batch_error_and_event_errors(cuda_engine, fake, make_handle):
    eng = cuda_engine(batch=True)
    host = pinned_empty((1, 8, 32), runtime=fake)
    _, dev = _device_pool(fake, 1, 8, 32)
    fake.fail("cudaMemcpyBatchAsync", cudaError_t.cudaErrorInvalidValue)
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), dev, [[0, 0], [2, 2]]).wait(10)
    assert h.failed and "cudaMemcpyBatchAsync failed" in h.error_text
    fake.fail("cudaEventQuery", cudaError_t.cudaErrorIllegalAddress)
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), dev, [[1, 1]]).wait(10)
    assert h.failed and "cudaErrorIllegalAddress" in h.error_text
    fake.fail("cudaEventRecord", cudaError_t.cudaErrorInvalidResourceHandle)
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(host), dev, [[3, 3]])
    assert job.done() and h.failed and "cudaEventRecord failed" in h.error_text
    assert fake.calls["cudaStreamSynchronize"] >= 1  # no event: the stream was drained first
    fake.fail("cudaStreamWaitEvent", cudaError_t.cudaErrorInvalidResourceHandle)
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), dev, [[4, 4]], compute_event=0x1234).wait(10)
    assert h.failed and "cudaStreamWaitEvent" in h.error_text
    assert eng.stats()["failed"] == 4


def test_batch_self_test_and_fallback(cuda_engine, make_handle):
    old = FakeRuntime(batch=False)
    eng = cuda_engine(runtime=old)
    assert not eng.batched and "no cudaMemcpyBatchAsync" in eng.stats()["batch_reason"]
    cuda12 = FakeRuntime(version=12040)
    assert not cuda_engine(runtime=cuda12).batched
    broken = FakeRuntime()
    broken.fail("cudaMemcpyBatchAsync", cudaError_t.cudaErrorNotSupported)
    eng = cuda_engine(runtime=broken)
    assert not eng.batched and "self-test failed" in eng.stats()["batch_reason"]
    broken.fail("cudaMemcpyBatchAsync", cudaError_t.cudaErrorNotSupported)
    with pytest.raises(CudaError, match="batch=True"):
        TransferEngine(None, backend="cuda", runtime=broken, batch=True)


def test_backpressure_on_stream_budget_and_pending(cuda_engine, fake, make_handle):
    fake.not_ready_polls = 10**9
    eng = cuda_engine(batch=False, max_stream_ops=8, max_pending=3)
    host = pinned_empty((1, 64, 32), runtime=fake)
    _, dev = _device_pool(fake, 1, 64, 32)
    hp = BlockPool.from_array(host)
    first = eng.submit(make_handle(), hp, dev, [[0, 0], [2, 2], [4, 4]])  # 3 copies + record = 4 ops
    second = eng.submit(make_handle(), hp, dev, [[6, 6], [8, 8], [10, 10]])  # 8 ops queued
    h = make_handle()
    t0 = time.perf_counter()
    with pytest.raises(TransferQueueFullError, match="h2d copy stream"):
        eng.submit(h, hp, dev, [[12, 12]])
    assert time.perf_counter() - t0 < 0.05 and not h.marks
    copies_before = len(fake.copies)
    third = eng.submit(make_handle(), dev, hp, [[1, 1]])  # other stream: fine
    with pytest.raises(TransferQueueFullError, match="max_pending=3"):
        eng.submit(h, dev, hp, [[3, 3]])
    assert len(fake.copies) == copies_before + 1  # the rejected job launched nothing
    fake.not_ready_polls = 0
    with fake._lock:
        for ev in fake.events:
            fake.events[ev] = 0
    assert all(j.wait(10) for j in (first, second, third))
    assert eng.submit(h, hp, dev, [[12, 12]]).wait(10) and h.completed
    big = eng.submit(make_handle(), hp, dev, [[i, i] for i in range(0, 64, 2)])  # > budget, stream idle
    assert big.wait(10) and big.ok


def test_one_reaper_thread_for_many_jobs(cuda_engine, fake, make_handle, rng):
    eng = cuda_engine()
    host = pinned_empty((2, 256, 64), runtime=fake)
    _, dev = _device_pool(fake, 2, 256, 64)
    hp = BlockPool.from_array(host)
    baseline = threading.active_count()
    peak = baseline
    jobs = []
    for i in range(200):
        jobs.append(eng.submit(make_handle(), hp, dev, random_pairs(rng, 256, 256, 4)))
        peak = max(peak, threading.active_count())
    while not all(j.done() for j in jobs):
        peak = max(peak, threading.active_count())
        time.sleep(0.001)
    assert all(j.ok for j in jobs)
    assert peak == baseline, "threads were started per job"
    assert eng.stats()["completed"] == 200


def test_close_releases_streams_and_events(fake, make_handle):
    eng = TransferEngine(None, backend="cuda", runtime=fake)
    host = pinned_empty((1, 8, 32), runtime=fake)
    _, dev = _device_pool(fake, 1, 8, 32)
    jobs = [eng.submit(make_handle(), BlockPool.from_array(host), dev, [[i, i]]) for i in range(5)]
    assert eng.close(timeout=10)
    assert all(j.ok for j in jobs), "close returned before completion"
    assert fake.destroyed_streams == fake.streams
    created = {e for e in fake.events}
    assert created and created <= fake.destroyed_events
    assert eng.close()  # idempotent


def test_device_checks(make_handle):
    two = FakeRuntime(num_devices=2)
    eng = TransferEngine(None, backend="cuda", runtime=two, device=0)
    try:
        host = pinned_empty((1, 8, 32), runtime=two)
        _, other = _device_pool(two, 1, 8, 32, device=1)
        assert other.device == "cuda:1"
        with pytest.raises(InvalidArgumentError, match="one engine per GPU"):
            eng.submit(make_handle(), BlockPool.from_array(host), other, [[0, 0]])
        lying = BlockPool.from_pointers([int(host.ctypes.data)], 8, 32, device="cuda:0", owner=host)
        h = make_handle()
        with pytest.raises(InvalidArgumentError, match="not device memory"):
            eng.submit(h, BlockPool.from_array(np.zeros((1, 8, 32), np.uint8)), lying, [[0, 0]])
        assert not h.marks
    finally:
        eng.close()


def test_handle_conversions():
    assert as_stream_handle(5) == 5
    assert as_stream_handle(types.SimpleNamespace(cuda_stream=7)) == 7  # torch
    assert as_stream_handle(types.SimpleNamespace(ptr=8)) == 8  # cupy
    proto = types.SimpleNamespace(__cuda_stream__=lambda: (0, 9))
    assert as_stream_handle(proto) == 9  # cuda.core protocol
    assert as_event_handle(types.SimpleNamespace(cuda_event=10)) == 10
    assert as_event_handle(FakeRuntime.cudaEvent_t(11)) == 11
    with pytest.raises(TypeError):
        as_event_handle("event")
    with pytest.raises(TypeError):
        as_stream_handle(True)
    with pytest.raises(InvalidArgumentError):
        as_event_handle(0)


def test_real_bindings_without_a_driver_fail_cleanly():
    rt = pytest.importorskip("cuda.bindings.runtime")
    ok, reason = cuda_available(rt)
    if ok:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(CudaError, match="no usable CUDA device"):
        TransferEngine(None, backend="cuda", runtime=rt)
    with pytest.raises(CudaError, match="cudaMallocHost failed"):
        pinned_empty(16, runtime=rt)


def test_cuda_options_object_is_the_keyword_options(fake):
    """``cuda=CudaOptions(...)`` configures the backend as the keywords do; the test seams
    (``runtime``, ``driver``) stay keywords beside it."""
    from kvsched.transfer import CudaOptions, TransferEngine

    opts = CudaOptions(max_stream_ops=7, batch=False, batch_chunk=9, auto_pin=False,
                       poll_interval=(1e-5, 1e-4))
    with TransferEngine(None, backend="cuda", runtime=fake, cuda=opts) as eng:
        b = eng._cuda
        assert (b.max_stream_ops, b.batch_chunk, b.auto_pin, b.batch_enabled) == (7, 9, False, False)
    with pytest.raises(TypeError, match="batch given both"):
        TransferEngine(None, backend="cuda", runtime=fake, cuda=opts, batch=True)
