"""The SM copy kernel on a real GPU (``sm_copy="force"``): byte-exact loads and stores of random
scattered blocks, sizes that take the 16-byte, 8-byte and byte loops, many descriptor windows,
bounds, and the store's wait for the compute stream. Skipped, with the reason, without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from transfer_helpers import FakeHandle, random_pairs

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool
from kvsched.transfer.copy_path import Calibration, CopyChoice
from kvsched.transfer.cudart import DeviceBuffer, check, load_runtime, pinned_empty, pinned_zeros
from kvsched.transfer.engine import TransferEngine

pytestmark = [pytest.mark.timeout(180), pytest.mark.gpu]


@pytest.fixture
def engine(gpu):
    made = []

    def factory(**kwargs):
        kwargs.setdefault("sm_copy", "force")
        eng = TransferEngine(None, backend="cuda", **kwargs)
        made.append(eng)
        return eng

    yield factory
    for eng in made:
        assert eng.close(timeout=60)


def _read_device(buf: DeviceBuffer) -> np.ndarray:
    rt = load_runtime()
    out = pinned_empty(buf.shape, buf.dtype)
    check(rt, rt.cudaMemcpy(int(out.ctypes.data), buf.ptr, buf.nbytes, rt.cudaMemcpyKind.cudaMemcpyDefault), "cudaMemcpy")
    return out


def _done(job, handle, timeout=30):
    assert job.wait(timeout), f"{job} did not finish"
    assert handle.marked.wait(5)
    assert handle.completed, handle.error_text
    return job


def test_self_test_passed(engine):
    eng = engine()
    assert eng._cuda.sm_mode == "force", eng._cuda.sm_reason
    assert "self-test passed" in eng._cuda.sm_reason


# 16-byte words; 8-byte words (4104 = 8 * 513: odd blocks 8-aligned only); bytes (4100, 4093)
@pytest.mark.parametrize("block_bytes", [16, 4096, 4104, 4100, 4093, 65536])
def test_round_trip_is_byte_exact(engine, block_bytes):
    rng = np.random.default_rng(block_bytes)
    eng = engine()
    layers, n = 2, 256
    host = pinned_empty((layers, n, block_bytes))
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    dev_buf = DeviceBuffer((layers, n, block_bytes))
    back = pinned_zeros((layers, n, block_bytes))
    pairs = random_pairs(rng, n, n, 200)
    h = FakeHandle()
    _done(eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev_buf), pairs), h)
    np.testing.assert_array_equal(_read_device(dev_buf)[:, pairs[:, 1]], host[:, pairs[:, 0]])
    store = np.stack([pairs[:, 1], rng.permutation(n)[:200]], axis=1)
    h = FakeHandle()
    _done(eng.submit(h, BlockPool.from_array(dev_buf), BlockPool.from_array(back), store), h)
    np.testing.assert_array_equal(back[:, store[:, 1]], host[:, pairs[:, 0]])
    untouched = np.setdiff1d(np.arange(n), store[:, 1])
    assert not back[:, untouched].any()
    assert eng._cuda.jobs_by_path["sm"] == 2


def test_many_copies_many_descriptor_windows(engine):
    rng = np.random.default_rng(7)
    eng = engine(sm_ctas=2)  # 16 warps: each walks ~1000 copies, ~30 windows of 32
    n, bb = 16384, 16
    host = pinned_empty((1, n, bb))
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    dev_buf = DeviceBuffer((1, n, bb))
    pairs = np.stack([rng.permutation(n), rng.permutation(n)], axis=1)
    h = FakeHandle()
    _done(eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev_buf), pairs), h)
    np.testing.assert_array_equal(_read_device(dev_buf)[:, pairs[:, 1]], host[:, pairs[:, 0]])


def test_bad_block_ids_are_refused_and_the_engine_goes_on(engine):
    eng = engine()
    host = pinned_zeros((1, 8, 4096))
    dev_buf = DeviceBuffer((1, 8, 4096))
    src, dst = BlockPool.from_array(host), BlockPool.from_array(dev_buf)
    for pairs in ([[0, 8]], [[8, 0]], [[-1, 0]]):
        with pytest.raises(InvalidArgumentError):
            eng.submit(FakeHandle(), src, dst, pairs)
    h = FakeHandle()
    _done(eng.submit(h, src, dst, [[1, 2]]), h)


def test_calibrated_auto_mode_uses_the_kernel_where_the_table_says(engine):
    cal = Calibration(cells={"h2d": ((4096, 1, CopyChoice("dma")), (4096, 64, CopyChoice("sm")))})
    eng = engine(sm_copy="auto", calibration=cal)
    rng = np.random.default_rng(3)
    host = pinned_empty((1, 512, 4096))
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    dev_buf = DeviceBuffer((1, 512, 4096))
    for count, path in ((16, "dma"), (256, "sm")):
        pairs = random_pairs(rng, 512, 512, count)
        before = eng._cuda.jobs_by_path[path]
        h = FakeHandle()
        _done(eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev_buf), pairs), h)
        np.testing.assert_array_equal(_read_device(dev_buf)[:, pairs[:, 1]], host[:, pairs[:, 0]])
        assert eng._cuda.jobs_by_path[path] == before + 1


def test_a_store_waits_for_the_compute_stream(engine):
    """The compute stream spins ~0.2 s, then writes the block (memset) and records the event the
    store waits on. A control store without the event must see the old bytes (the test can see
    the hazard); the gated store must see the new ones."""
    from kvsched.bench.gpu_compute import GpuCompute

    eng = engine()
    rt = load_runtime()
    dev_buf = DeviceBuffer((1, 4, 4096))
    check(rt, rt.cudaMemset(dev_buf.ptr, 1, dev_buf.nbytes), "cudaMemset")
    dev = BlockPool.from_array(dev_buf)
    results = {}
    with GpuCompute() as compute:
        for gated in (False, True):
            out = pinned_zeros((1, 4, 4096))
            compute.layer(0.2)
            check(rt, rt.cudaMemsetAsync(dev_buf.ptr, 7 if gated else 5, dev_buf.nbytes, compute.stream),
                  "cudaMemsetAsync")
            event = compute.record()
            h = FakeHandle()
            job = eng.submit(h, dev, BlockPool.from_array(out), [[0, 0]], compute_event=event if gated else None)
            _done(job, h)
            compute.synchronize()
            results[gated] = int(out[0, 0, 0])
    assert results[False] == 1, "the control store should have read before the compute stream wrote"
    assert results[True] == 7
