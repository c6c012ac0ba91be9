"""The cuda backend on a real GPU. Skipped, with the reason, where no CUDA device is usable.

The ordering tests each run a *control* first: the same copy without the event, which must
observe the hazard (a stale read or an early overwrite). That proves the test can see a race, so
the gated run passing means the copy stream really waited on the GPU, not that it was lucky.
A sleep kernel on the compute stream (torch.cuda._sleep, or a cupy clock64 spin) holds the
compute work back long enough (~0.2 s) for an unordered copy to land first.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from transfer_helpers import FakeHandle, random_pairs

from kvsched.pool import BlockPool
from kvsched.transfer.cudart import DeviceBuffer, pinned_empty, pinned_zeros
from kvsched.transfer.engine import TransferEngine
from kvsched.transfer.errors import TransferQueueFullError

pytestmark = [pytest.mark.timeout(180), pytest.mark.gpu]

SLEEP_S = 0.2


@pytest.fixture
def engine(gpu):
    made = []

    def factory(**kwargs):
        eng = TransferEngine(None, backend="cuda", **kwargs)
        made.append(eng)
        return eng

    yield factory
    for eng in made:
        assert eng.close(timeout=60)


def _read_device(buf: DeviceBuffer) -> np.ndarray:
    from kvsched.transfer.cudart import check, load_runtime

    rt = load_runtime()
    out = pinned_empty(buf.shape, buf.dtype)
    check(rt, rt.cudaMemcpy(int(out.ctypes.data), buf.ptr, buf.nbytes, rt.cudaMemcpyKind.cudaMemcpyDefault), "cudaMemcpy")
    return out


def _done(job, handle, timeout=30):
    assert job.wait(timeout), f"{job} did not finish"
    assert handle.marked.wait(5)
    assert handle.completed, handle.error_text
    return job


# ----------------------------------------------------------------------------- compute helpers


def _calibrate(spin, timed) -> float:
    """GPU clock cycles per second of the spin kernel, measured (device properties report clock
    rates in units that changed between versions)."""
    timed(lambda: spin(1e5))  # warm-up (module load)
    cycles = 2e7
    seconds = timed(lambda: spin(cycles))
    if seconds <= 0:
        raise RuntimeError("could not time the spin kernel")
    return cycles / seconds


class _Torch:
    """Compute-stream work with torch."""

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA")
        self.torch = torch
        self.cycles_per_s = _calibrate(self._spin, self._timed)

    def _spin(self, cycles):
        self.torch.cuda._sleep(int(cycles))

    def _timed(self, fn):
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.uint8, device="cuda")

    def index(self, blocks):
        return self.torch.tensor(blocks, dtype=self.torch.long, device="cuda")

    def stream(self):
        return self.torch.cuda.Stream()

    def sleep(self, stream, seconds):
        with self.torch.cuda.stream(stream):
            self._spin(seconds * self.cycles_per_s)

    def fill(self, arr, stream, idx, value):
        with self.torch.cuda.stream(stream):
            arr.index_fill_(1, idx, value)

    def empty_like_blocks(self, arr, idx):
        return self.torch.empty((arr.shape[0], idx.numel()) + tuple(arr.shape[2:]), dtype=arr.dtype, device="cuda")

    def read(self, arr, stream, idx, out):
        with self.torch.cuda.stream(stream):
            self.torch.index_select(arr, 1, idx, out=out)
        return out

    def record(self, stream):
        ev = self.torch.cuda.Event()
        ev.record(stream)
        return ev

    def numpy(self, arr):
        self.torch.cuda.synchronize()
        return arr.cpu().numpy()

    def synchronize(self):
        self.torch.cuda.synchronize()


class _Cupy:
    """The same with cupy and a clock64 spin kernel."""

    _SPIN = r"""
    extern "C" __global__ void spin(long long cycles) {
        long long start = clock64();
        while (clock64() - start < cycles) { }
    }
    """

    def __init__(self):
        import cupy

        self.cp = cupy
        self.kernel = cupy.RawKernel(self._SPIN, "spin")
        self.cycles_per_s = _calibrate(self._spin, self._timed)

    def _spin(self, cycles):
        self.kernel((1,), (1,), (np.int64(cycles),))

    def _timed(self, fn):
        start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return self.cp.cuda.get_elapsed_time(start, end) / 1e3

    def zeros(self, shape):
        return self.cp.zeros(shape, dtype=self.cp.uint8)

    def index(self, blocks):
        return self.cp.asarray(blocks, dtype=self.cp.int64)

    def stream(self):
        return self.cp.cuda.Stream(non_blocking=True)

    def sleep(self, stream, seconds):
        with stream:
            self._spin(seconds * self.cycles_per_s)

    def fill(self, arr, stream, idx, value):
        with stream:
            arr[:, idx] = value

    def empty_like_blocks(self, arr, idx):
        return self.cp.empty((arr.shape[0], idx.size) + tuple(arr.shape[2:]), dtype=arr.dtype)

    def read(self, arr, stream, idx, out):
        with stream:
            self.cp.take(arr, idx, axis=1, out=out)
        return out

    def record(self, stream):
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(stream)
        return ev

    def numpy(self, arr):
        self.cp.cuda.Device().synchronize()
        return self.cp.asnumpy(arr)

    def synchronize(self):
        self.cp.cuda.Device().synchronize()


@pytest.fixture(scope="module")
def compute(gpu):
    errors = []
    for cls in (_Torch, _Cupy):
        try:
            return cls()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{cls.__name__[1:].lower()}: {type(exc).__name__}: {exc}")
    pytest.skip("ordering tests need torch or cupy for compute-stream kernels (" + "; ".join(errors) + ")")


# ----------------------------------------------------------------------------- copies


@pytest.mark.parametrize("batch", ["driver", "bindings", False])
@pytest.mark.parametrize("block_bytes", [4096, 256 * 1024])
def test_gpu_round_trip_scattered_blocks(engine, batch, block_bytes):
    rng = np.random.default_rng(0)
    layers, n = 4, 512 if block_bytes == 4096 else 32
    eng = engine(batch=batch)
    host = pinned_empty((layers, n, block_bytes))
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    back = pinned_zeros((layers, n, block_bytes))
    dev_buf = DeviceBuffer((layers, n, block_bytes))
    dev = BlockPool.from_array(dev_buf)
    assert dev.device == "cuda:0"
    load_pairs = random_pairs(rng, n, n, n // 2)
    h = FakeHandle(request_id="load")
    load = _done(eng.submit(h, BlockPool.from_array(host), dev, load_pairs), h)
    assert load.kind == "h2d"
    store_pairs = np.stack([load_pairs[:, 1], np.arange(n // 2)], axis=1)
    h = FakeHandle(request_id="store")
    _done(eng.submit(h, dev, BlockPool.from_array(back), store_pairs), h)
    np.testing.assert_array_equal(back[:, : n // 2], host[:, load_pairs[:, 0]])
    assert not back[:, n // 2 :].any()
    np.testing.assert_array_equal(_read_device(dev_buf)[:, load_pairs[:, 1]], host[:, load_pairs[:, 0]])


def test_gpu_batched_copies_available(engine):
    eng = engine()
    stats = eng.stats()
    assert eng.batched, f"cudaMemcpyBatchAsync unusable: {stats['batch_reason']}"
    assert stats["batch_mode"] == "driver", f"C-array batches unusable: {stats['batch_reason']}"


@pytest.mark.parametrize("batch,skip_bind", [("driver", False), ("driver", True), ("bindings", False)])
def test_gpu_batches_from_threads_that_never_touched_cuda(engine, batch, skip_bind):
    """Submitting threads with no CUDA context yet (the driver API needs one current), several
    batch calls per job, and many threads at once on one engine. With skip_bind, each thread
    skips the binding before its first driver call, so the driver call itself meets the missing
    context (refused and retried after binding, or served through the stream's context)."""
    rng = np.random.default_rng(2)
    eng = engine(batch=batch)
    n, size, threads = 2048, 4096, 4
    host = pinned_empty((1, n, size))
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    dev_buf = DeviceBuffer((1, n, size))
    hp, dev = BlockPool.from_array(host), BlockPool.from_array(dev_buf)
    slices = np.array_split(rng.permutation(n), threads)  # disjoint destinations per thread
    outcomes = []
    # One job from this thread first: the pools' one-time checks (runtime calls that would bind
    # a context) happen here, not in the threads below.
    warm = FakeHandle(request_id="warm-up")
    _done(eng.submit(warm, hp, dev, np.stack([slices[0][:4], slices[0][:4]], axis=1)), warm)

    def run(ids):
        h = FakeHandle(request_id="thread")
        pairs = np.stack([ids, ids], axis=1)
        if skip_bind:
            eng._cuda._bound_threads.bound = True  # (a lie, for this thread only)
        try:
            job = eng.submit(h, hp, dev, pairs)
            outcomes.append((job.wait(30), h.completed, h.error_text))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcomes.append((False, False, repr(exc)))

    workers = [threading.Thread(target=run, args=(ids,)) for ids in slices]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert outcomes and all(done and ok for done, ok, _ in outcomes), outcomes
    np.testing.assert_array_equal(_read_device(dev_buf), host)


def test_gpu_pageable_host_pool_is_pinned_and_exact(engine):
    rng = np.random.default_rng(1)
    eng = engine()
    host = rng.integers(0, 256, (2, 64, 8192), dtype=np.uint8)  # plain numpy: pageable
    back = np.zeros_like(host)
    dev = BlockPool.from_array(DeviceBuffer(host.shape))
    pairs = random_pairs(rng, 64, 64, 40)
    h = FakeHandle()
    _done(eng.submit(h, BlockPool.from_array(host), dev, pairs), h)
    h = FakeHandle()
    _done(eng.submit(h, dev, BlockPool.from_array(back), np.stack([pairs[:, 1], pairs[:, 1]], 1)), h)
    np.testing.assert_array_equal(back[:, pairs[:, 1]], host[:, pairs[:, 0]])


def test_gpu_d2d(engine):
    rng = np.random.default_rng(2)
    eng = engine()
    host = pinned_empty((1, 16, 4096))
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    a_buf, b_buf = DeviceBuffer(host.shape), DeviceBuffer(host.shape)
    a, b = BlockPool.from_array(a_buf), BlockPool.from_array(b_buf)
    h = FakeHandle()
    _done(eng.submit(h, BlockPool.from_array(host), a, [[i, i] for i in range(16)]), h)
    h = FakeHandle()
    job = _done(eng.submit(h, a, b, [[3, 0], [4, 1], [9, 7]]), h)
    assert job.kind == "d2d"
    got = _read_device(b_buf)
    np.testing.assert_array_equal(got[0, [0, 1, 7]], host[0, [3, 4, 9]])


def test_gpu_torch_vllm_layout_bf16(engine):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    eng = engine()
    layers, n = 3, 40
    shape = (2, n, 16, 2, 64)  # vLLM FlashAttention per layer, bfloat16 (DLPack path)
    src = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    dst = [torch.zeros(shape, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    gpu_src, gpu_dst = BlockPool.from_layers(src, block_dim=1), BlockPool.from_layers(dst, block_dim=1)
    assert gpu_src.dtype == "bfloat16" and gpu_src.num_pieces == 2
    piece = 16 * 2 * 64 * 2
    host = pinned_zeros((layers, 2, n, piece))  # bytes: matches any dtype
    staging = BlockPool.from_array(host, block_dim=2)
    pairs = np.array([[1, 30], [2, 31], [3, 32], [17, 5]])
    torch.cuda.synchronize()
    h = FakeHandle()
    _done(eng.submit(h, gpu_src, staging, pairs), h)
    back = np.stack([np.stack([host[layer, kv, 30:33] for kv in range(2)]) for layer in range(layers)])
    want = np.stack([src[layer][:, 1:4].contiguous().view(torch.uint8).cpu().numpy().reshape(2, 3, piece) for layer in range(layers)])
    np.testing.assert_array_equal(back, want)
    h = FakeHandle()
    _done(eng.submit(h, staging, gpu_dst, [[30, 0], [31, 1], [32, 2], [5, 9]]), h)
    for layer in range(layers):
        assert torch.equal(dst[layer][:, 0:3], src[layer][:, 1:4])
        assert torch.equal(dst[layer][:, 9], src[layer][:, 17])


def test_gpu_cupy_pool(engine):
    cupy = pytest.importorskip("cupy")
    eng = engine()
    arr = cupy.arange(2 * 8 * 64, dtype=cupy.uint8).reshape(2, 8, 64)
    pool = BlockPool.from_array(arr)
    host = pinned_zeros((2, 8, 64))
    cupy.cuda.Device().synchronize()
    h = FakeHandle()
    _done(eng.submit(h, pool, BlockPool.from_array(host), [[5, 0]]), h)
    np.testing.assert_array_equal(host[:, 0], cupy.asnumpy(arr[:, 5]))


# ----------------------------------------------------------------------------- GPU-side ordering
#
# Any host-side synchronisation between the compute kernels and the submit (a cudaMalloc by the
# caching allocator, a lazily loaded kernel module) would serialise the copy behind the sleep and
# hide the hazard. So every compute op runs once before (warm-up, same shapes, same streams),
# outputs are preallocated, and each control checks that the host was not held up.


def _warm(compute, eng, arr, pool, host_pool, idx, streams, out):
    for st in streams:
        compute.fill(arr, st, idx, 0)
        compute.read(arr, st, idx, out)
        compute.sleep(st, 0.001)
        compute.record(st)
    compute.synchronize()
    h = FakeHandle(request_id="warm-up")
    _done(eng.submit(h, pool, host_pool, [[0, 0]]), h)
    h = FakeHandle(request_id="warm-up")
    _done(eng.submit(h, host_pool, pool, [[0, 0]]), h)


class _HostClock:
    """Checks that the host did not block while the compute stream slept."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def check(self, what):
        elapsed = time.perf_counter() - self.t0
        assert elapsed < SLEEP_S / 2, (
            f"{what}: the host was blocked {elapsed * 1e3:.0f} ms behind the sleeping compute stream "
            "(an implicit synchronisation); the control cannot show the hazard"
        )


def test_gpu_store_waits_for_compute_event(engine, compute):
    """RAW: a store must not read a block before the compute stream has written it."""
    eng = engine()
    layers, n, bb = 2, 64, 4096
    dev = compute.zeros((layers, n, bb))
    pool = BlockPool.from_array(dev)
    blocks = [3, 10, 11, 40]
    idx = compute.index(blocks)
    s = compute.stream()
    pairs = [[b, b] for b in blocks]
    scratch = compute.empty_like_blocks(dev, idx)
    _warm(compute, eng, dev, pool, BlockPool.from_array(pinned_zeros((layers, n, bb))), idx, [s], scratch)

    # control: no event -> the copy reads the blocks before the (delayed) kernel writes them
    host = pinned_zeros((layers, n, bb))
    clock = _HostClock()
    compute.sleep(s, SLEEP_S)
    compute.fill(dev, s, idx, 0xCD)
    h = FakeHandle(request_id="ungated-store")
    job = eng.submit(h, pool, BlockPool.from_array(host), pairs)
    clock.check("ungated store")
    _done(job, h)
    compute.synchronize()
    assert not host[:, blocks].any(), "control: the ungated store did not race; the test cannot see the hazard"

    # gated: the copy stream waits for the compute stream's event on the GPU
    host = pinned_zeros((layers, n, bb))
    clock = _HostClock()
    compute.sleep(s, SLEEP_S)
    compute.fill(dev, s, idx, 0xAB)
    ev = compute.record(s)
    h = FakeHandle(request_id="gated-store")
    job = eng.submit(h, pool, BlockPool.from_array(host), pairs, compute_event=ev)
    clock.check("gated store")
    _done(job, h)
    assert (host[:, blocks] == 0xAB).all(), "the store read blocks before the compute stream wrote them"
    assert not np.delete(host, blocks, axis=1).any()


def test_gpu_load_waits_for_last_read(engine, compute):
    """WAR: a load into reused blocks must not overwrite them while the compute stream may still
    read them."""
    eng = engine()
    layers, n, bb = 2, 64, 4096
    dev = compute.zeros((layers, n, bb))
    pool = BlockPool.from_array(dev)
    blocks = [0, 1, 2, 33]
    idx = compute.index(blocks)
    s, other = compute.stream(), compute.stream()
    host = pinned_zeros((layers, n, bb))
    host[:, blocks] = 0x22
    src = BlockPool.from_array(host)
    pairs = [[b, b] for b in blocks]
    snap = compute.empty_like_blocks(dev, idx)
    _warm(compute, eng, dev, pool, BlockPool.from_array(pinned_zeros((layers, n, bb))), idx, [s, other], snap)

    def reset():
        compute.fill(dev, other, idx, 0x11)
        compute.fill(snap, other, compute.index(list(range(len(blocks)))), 0)
        compute.synchronize()

    # control: no event -> the load overwrites before the delayed read
    reset()
    clock = _HostClock()
    compute.sleep(s, SLEEP_S)
    compute.read(dev, s, idx, snap)
    h = FakeHandle(request_id="ungated-load")
    job = eng.submit(h, src, pool, pairs)
    clock.check("ungated load")
    _done(job, h)
    assert (compute.numpy(snap) == 0x22).all(), "control: the ungated load did not race; the test cannot see the hazard"

    # gated on the event recorded after the last read
    reset()
    clock = _HostClock()
    compute.sleep(s, SLEEP_S)
    compute.read(dev, s, idx, snap)
    last_read = compute.record(s)
    h = FakeHandle(request_id="gated-load")
    job = eng.submit(h, src, pool, pairs, wait_event=last_read)
    clock.check("gated load")
    _done(job, h)
    assert (compute.numpy(snap) == 0x11).all(), "the load overwrote blocks the compute stream had not read yet"
    assert (compute.numpy(dev)[:, blocks] == 0x22).all()


def test_gpu_compute_waits_for_load(engine, compute):
    """The compute stream waits on a load's completion event (job.wait_on) before reading."""
    eng = engine()
    layers, n, bb = 2, 32, 4096
    dev = compute.zeros((layers, n, bb))
    pool = BlockPool.from_array(dev)
    blocks = [4, 5, 20]
    idx = compute.index(blocks)
    s, side = compute.stream(), compute.stream()
    host = pinned_zeros((layers, n, bb))
    host[:, blocks] = 0x33
    src = BlockPool.from_array(host)
    pairs = [[b, b] for b in blocks]
    out = compute.empty_like_blocks(dev, idx)
    _warm(compute, eng, dev, pool, BlockPool.from_array(pinned_zeros((layers, n, bb))), idx, [s, side], out)
    compute.fill(dev, s, idx, 0)
    compute.synchronize()

    # control: the load is held back on the GPU; a compute read that does not wait sees old data
    clock = _HostClock()
    compute.sleep(side, SLEEP_S)
    gate = compute.record(side)
    h = FakeHandle(request_id="load-not-awaited")
    job = eng.submit(h, src, pool, pairs, wait_event=gate)
    compute.read(dev, s, idx, out)
    clock.check("load, read without waiting")
    assert not compute.numpy(out).any(), "control: the read did not race the delayed load"
    _done(job, h)
    compute.fill(dev, s, idx, 0)
    compute.synchronize()

    clock = _HostClock()
    compute.sleep(side, SLEEP_S)
    gate = compute.record(side)
    h = FakeHandle(request_id="load-awaited")
    job = eng.submit(h, src, pool, pairs, wait_event=gate)
    assert job.event is not None
    job.wait_on(s)  # GPU-side: compute stream waits for the load's event
    compute.read(dev, s, idx, out)
    clock.check("load, read after wait_on")
    assert (compute.numpy(out) == 0x33).all(), "the compute stream read before the load landed"
    _done(job, h)


# ----------------------------------------------------------------------------- completion, bounds


def test_gpu_no_thread_per_job(engine):
    rng = np.random.default_rng(3)
    eng = engine()
    n, bb = 1024, 65536
    host = pinned_empty((1, n, bb))
    dev = BlockPool.from_array(DeviceBuffer((1, n, bb)))
    hp = BlockPool.from_array(host)
    h = FakeHandle()
    _done(eng.submit(h, hp, dev, [[0, 0]]), h)  # warm-up: pinning, first events
    baseline = threading.active_count()
    peak = baseline
    handles, jobs = [], []
    for _ in range(200):
        h = FakeHandle()
        handles.append(h)
        jobs.append(eng.submit(h, hp, dev, random_pairs(rng, n, n, 4)))
        peak = max(peak, threading.active_count())
    while not all(j.done() for j in jobs):
        peak = max(peak, threading.active_count())
        time.sleep(0.0005)
    assert peak == baseline, f"{peak - baseline} extra threads while 200 jobs ran"
    assert all(h.completed for h in handles)
    assert eng.stats()["completed"] == 201


def test_gpu_submission_never_blocks_on_a_busy_stream(engine, compute):
    eng = engine(max_stream_ops=16, batch=False)
    n, bb = 64, 4096
    host = pinned_zeros((1, n, bb))
    dev = BlockPool.from_array(DeviceBuffer((1, n, bb)))
    hp = BlockPool.from_array(host)
    side = compute.stream()
    compute.sleep(side, SLEEP_S)
    gate = compute.record(side)  # the d2h stream stays blocked behind this for ~0.2 s
    jobs, worst = [], 0.0
    with pytest.raises(TransferQueueFullError):
        for i in range(64):
            h = FakeHandle()
            t0 = time.perf_counter()
            jobs.append((h, eng.submit(h, dev, hp, [[i, i], [(i + 7) % n, (i + 7) % n]], compute_event=gate)))
            worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.01, f"a submit took {worst * 1e3:.1f} ms while the stream was blocked"
    assert 1 <= len(jobs) < 64
    for h, job in jobs:
        _done(job, h)
