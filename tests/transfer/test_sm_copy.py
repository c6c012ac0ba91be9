"""The SM copy path on a CPU-only machine, against the stand-in runtime and driver
(fake_cudart.py, whose cuLaunchKernel does what the kernel does with the descriptor table it is
given): PTX loading, launch shape, argument packing, descriptor tables, bounds, the path choice
inside the backend, the self-test, errors. The kernel itself runs in test_sm_copy_gpu.py."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from fake_cudart import CUresult, FakeDriver, FakeRuntime, cudaDeviceAttr
from transfer_helpers import random_pairs

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool
from kvsched.transfer.copy_path import Calibration, CopyChoice, DmaSettings
from kvsched.transfer.cudart import DeviceBuffer, pinned_empty
from kvsched.transfer.engine import TransferEngine
from kvsched.transfer.errors import CudaError
from kvsched.transfer.options import CudaOptions
from kvsched.transfer.sm_copy import (
    KERNEL_NAME,
    DescriptorTables,
    SmCopier,
    check_bounds,
    launch_config,
    pack_descriptors,
    ptx_image,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def driver(fake):
    return FakeDriver(fake)


@pytest.fixture
def bound(fake):
    """The calling thread has a current context, as the backend arranges before driver calls."""
    fake.cudaFree(0)
    return fake


def _read(buf: DeviceBuffer) -> np.ndarray:
    raw = (ctypes.c_ubyte * buf.nbytes).from_address(buf.ptr)
    return np.frombuffer(raw, dtype=np.uint8).reshape(buf.shape).copy()


def _pools(rt, rng, layers=2, n=64, bb=4096):
    host = pinned_empty((layers, n, bb), runtime=rt)
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    dev = DeviceBuffer((layers, n, bb), runtime=rt)
    return host, dev


# ------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("count, ctas, want", [
    (1, 12, 1), (8, 12, 1), (9, 12, 2), (96, 12, 12), (97, 12, 12), (100_000, 12, 12), (100_000, 1, 1),
    (64, 16, 8),
])
def test_launch_config_is_one_warp_per_copy_capped(count, ctas, want):
    assert launch_config(count, ctas) == (want, 256)


def test_launch_config_refuses_empty_launches_and_odd_blocks():
    with pytest.raises(ValueError):
        launch_config(0)
    for threads in (0, 31, 48, 2048):
        with pytest.raises(ValueError):
            launch_config(1, 12, threads)


def test_descriptor_layout_is_destinations_sources_sizes():
    table = np.zeros(3 * 4 + 6, dtype=np.uint64)
    assert pack_descriptors(table, [10, 11, 12, 13], [20, 21, 22, 23], [1, 2, 3, 4]) == 4
    assert table[:12].tolist() == [10, 11, 12, 13, 20, 21, 22, 23, 1, 2, 3, 4]
    assert not table[12:].any()
    arrays = [np.array(v, dtype=np.int64) for v in ([7, 8], [5, 6], [3, 3])]
    pack_descriptors(table, *arrays)
    assert table[:6].tolist() == [7, 8, 5, 6, 3, 3]
    with pytest.raises(ValueError, match="differ"):
        pack_descriptors(table, [1], [1, 2], [1])
    with pytest.raises(ValueError, match="need"):
        pack_descriptors(np.zeros(5, np.uint64), [1, 2], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="words"):
        pack_descriptors(np.zeros(9, np.int64), [1], [1], [1])


def test_check_bounds_finds_the_first_copy_outside_the_extents():
    starts = np.array([1000, 5000], dtype=np.int64)
    ends = np.array([2000, 6000], dtype=np.int64)
    assert check_bounds([1000, 1990, 5000, 5999], [10, 10, 1000, 1], starts, ends) == -1
    assert check_bounds([1000, 1995], [10, 10], starts, ends) == 1      # runs past the end
    assert check_bounds([999], [1], starts, ends) == 0                  # before the first extent
    assert check_bounds([1000, 2000], [1, 1], starts, ends) == 1        # in the gap
    assert check_bounds([1500, 1800], [100, 3000], starts, ends) == 1   # spans the gap
    assert check_bounds([6000], [1], starts, ends) == 0                 # past the last
    assert check_bounds([1000], [0], starts, ends) == 0                 # an empty copy is a bug
    assert check_bounds([], [], starts, ends) == -1


def test_descriptor_tables_are_recycled_by_capacity(fake):
    tables = DescriptorTables(fake, keep=1)
    a = tables.take(10)
    assert a.dtype == np.uint64 and a.size == 3 * 256
    tables.give(a)
    assert tables.take(200) is a                  # same capacity class
    b = tables.take(300)
    assert b.size == 3 * 512
    tables.give(a)
    c = tables.take(256)
    assert c is a
    d = tables.take(256)                          # none free: a new one
    tables.give(c)
    tables.give(d)                                # keep=1: dropped
    assert tables.take(1) is c and tables.take(1) is not d
    assert fake.calls["cudaMallocHost"] == 4


# ------------------------------------------------------------------------------ the loader


def test_ptx_loading_call_sequence(bound, driver):
    sm = SmCopier(driver, max_ctas=4)
    assert driver.calls == ["cuModuleLoadData", "cuModuleGetFunction"]
    assert driver.images == [ptx_image()]
    assert ptx_image().endswith(b"\0") and ptx_image().count(b"\0") == 1
    assert b".entry " + KERNEL_NAME in ptx_image()
    assert list(driver.functions.values()) == [KERNEL_NAME]
    assert (b"cuLaunchKernel", 4000, 1) in driver.lookups
    sm.close()
    sm.close()
    assert driver.calls[-1] == "cuModuleUnload" and driver.calls.count("cuModuleUnload") == 1
    assert not driver.modules


def test_load_failures_name_the_call(bound, driver):
    driver.load_error = CUresult.CUDA_ERROR_INVALID_VALUE
    with pytest.raises(CudaError, match="cuModuleLoadData .*CUDA_ERROR_INVALID_VALUE"):
        SmCopier(driver)
    driver.load_error = None
    with pytest.raises(CudaError, match="cuModuleGetFunction"):
        SmCopier(driver, image=b"// a module without the kernel")
    assert not driver.modules  # the module loaded before the failure was unloaded
    driver.has_launch = False
    with pytest.raises(CudaError, match="cuLaunchKernel"):
        SmCopier(driver)
    with pytest.raises(ValueError, match="sm_ctas"):
        SmCopier(driver, max_ctas=0)


def test_arguments_reach_the_kernel_through_kernel_params(bound, driver, rng):
    sm = SmCopier(driver, max_ctas=3)
    src = pinned_empty(64 * 100, runtime=bound)
    src[:] = rng.integers(0, 256, src.shape, dtype=np.uint8)
    dst = DeviceBuffer(64 * 100, runtime=bound)
    order = rng.permutation(100)
    table = pinned_empty(3 * 100, np.uint64, runtime=bound)
    sp, dp = int(src.ctypes.data), dst.ptr
    pack_descriptors(table, (dp + order * 64).tolist(), (sp + np.arange(100) * 64).tolist(), [64] * 100)
    stream = bound.cudaStreamCreateWithFlags(1)[1]
    assert sm.launch(int(table.ctypes.data), 100, int(stream)) == 0
    launch = driver.launches[-1]
    assert launch == {"grid": 3, "block": 256, "shared": 0, "stream": int(stream), "count": 100,
                      "table": int(table.ctypes.data)}
    np.testing.assert_array_equal(_read(dst).reshape(100, 64)[order], src.reshape(100, 64))


# ------------------------------------------------------------------------------ in the backend


def test_forced_sm_path_round_trip_is_byte_exact_and_gated(cuda_engine, fake, driver, make_handle, rng):
    eng = cuda_engine(driver=driver, sm_copy="force", sm_ctas=5)
    cuda = eng._cuda
    assert cuda.sm_mode == "force" and "self-test passed" in cuda.sm_reason
    self_test, dma_calls = len(driver.launches), len(driver.batches)  # the start-up self-tests
    host, dev = _pools(fake, rng)
    back = np.zeros_like(host)
    pairs = random_pairs(rng, 64, 64, 40)
    waited = fake.cudaEventCreateWithFlags(2)[1]
    h = make_handle()
    load = eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev), pairs, wait_event=int(waited))
    assert load.wait(10) and h.completed
    np.testing.assert_array_equal(_read(dev)[:, pairs[:, 1]], host[:, pairs[:, 0]])
    stream = eng.stream("h2d")
    # the copy stream waited for the event, then ran the kernel, then recorded the job's event
    assert [t for t in fake.trace if t[1] == stream][-3:] == [("wait", stream), ("kernel", stream),
                                                              ("record", stream)]
    h2 = make_handle()
    store_pairs = np.stack([pairs[:, 1], np.arange(40)], axis=1)
    store = eng.submit(h2, BlockPool.from_array(dev), BlockPool.from_array(back), store_pairs)
    assert store.wait(10) and h2.completed
    np.testing.assert_array_equal(back[:, :40], host[:, pairs[:, 0]])
    assert not back[:, 40:].any()
    assert [lc["count"] for lc in driver.launches[self_test:]] == [load.num_copies, store.num_copies]
    assert all(lc["grid"] == 5 for lc in driver.launches[self_test:])
    assert cuda.jobs_by_path == {"dma": 0, "loop": 0, "sm": 2}
    assert len(driver.batches) == dma_calls and not fake.batches  # no DMA at all
    assert not driver.errors


def test_tables_go_back_when_the_job_completes(cuda_engine, fake, driver, make_handle, rng):
    eng = cuda_engine(driver=driver, sm_copy="force")
    host, dev = _pools(fake, rng)
    for _ in range(5):
        h = make_handle()
        assert eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev), random_pairs(rng, 64, 64, 8)).wait(10)
    assert eng.wait_idle(10)
    # the self-test held two tables of 512 copies at once; every job here took the same one of 256
    assert len({lc["table"] for lc in driver.launches[2:]}) == 1 and len(driver.launches) == 7


def test_auto_with_the_built_in_calibration_keeps_the_copy_engine(cuda_engine, fake, driver, make_handle, rng):
    eng = cuda_engine(driver=driver, sm_copy="auto")
    assert eng._cuda.sm_mode == "auto"
    launches = len(driver.launches)
    host, dev = _pools(fake, rng)
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev), random_pairs(rng, 64, 64, 40)).wait(10)
    assert len(driver.launches) == launches and driver.batches
    assert eng._cuda.jobs_by_path["sm"] == 0


def test_auto_follows_the_calibration_per_job(cuda_engine, fake, driver, make_handle, rng):
    cal = Calibration(cells={
        "h2d": ((4096, 1, CopyChoice("dma")), (4096, 32, CopyChoice("sm")), (65536, 1, CopyChoice("dma"))),
    })
    eng = TransferEngine(None, backend="cuda", runtime=fake, driver=driver,
                         cuda=CudaOptions(sm_copy="auto", calibration=cal, poll_interval=(1e-5, 1e-4)))
    launches = len(driver.launches)
    host, dev = _pools(fake, rng)
    big_host, big_dev = _pools(fake, rng, layers=1, n=8, bb=65536)
    cases = [(host, dev, 40, "sm"),         # 80 copies of 4 KiB
             (host, dev, 8, "dma"),         # 16 copies: below the crossover
             (big_host, big_dev, 4, "dma")]  # 64 KiB blocks
    for src, dst, n, want in cases:
        before = dict(eng._cuda.jobs_by_path)
        n_blocks = src.shape[1]
        pairs = random_pairs(rng, n_blocks, n_blocks, n)
        h = make_handle()
        assert eng.submit(h, BlockPool.from_array(src), BlockPool.from_array(dst), pairs).wait(10) and h.completed
        np.testing.assert_array_equal(_read(dst)[:, pairs[:, 1]], src[:, pairs[:, 0]])
        assert eng._cuda.jobs_by_path[want] == before[want] + 1, (n, want)
    assert len(driver.launches) == launches + 1
    # stores have no cells: the copy engine
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(dev), BlockPool.from_array(np.zeros_like(host)),
                      random_pairs(rng, 64, 64, 40)).wait(10)
    assert len(driver.launches) == launches + 1
    assert eng.close(timeout=10)


def test_dma_settings_come_from_the_calibration(cuda_engine, fake, driver, make_handle, rng):
    flat = CopyChoice("dma", DmaSettings(prefer_overlap=False, one_call=True))
    eng = cuda_engine(driver=driver, batch_chunk=4096,
                      calibration=Calibration(cells={"h2d": ((1, 1, flat),)}))
    host, dev = _pools(fake, rng, n=256)
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev), random_pairs(rng, 256, 256, 200))
    assert job.wait(10) and h.completed
    assert driver.batches[-1] == job.num_copies == 400   # one call, not 32 + 64 + 128 + ...
    assert driver.flags_seen[-1] == 0
    h = make_handle()  # a store: the built-in settings (hint on, chunks from 32)
    job = eng.submit(h, BlockPool.from_array(dev), BlockPool.from_array(np.zeros_like(host)),
                     random_pairs(rng, 256, 256, 200))
    assert job.wait(10)
    calls = len(driver.batches) - driver.batches.index(400) - 1
    assert driver.flags_seen[-1] == 1 and driver.batches[-calls:][:3] == [32, 64, 128]
    assert sum(driver.batches[-calls:]) == job.num_copies


def test_self_test_failure_falls_back_or_raises(fake, driver):
    driver.corrupt_next = 1  # the self-test's last copy comes back one byte short
    eng = TransferEngine(None, backend="cuda", runtime=fake, driver=driver, sm_copy="auto")
    try:
        assert eng._cuda.sm_mode == "off" and "differs" in eng._cuda.sm_reason
        assert driver.calls[-1] == "cuModuleUnload"
    finally:
        eng.close()
    driver.corrupt_next = 1
    streams = len(fake.destroyed_streams)
    with pytest.raises(CudaError, match="sm_copy=True but the SM copy kernel is unusable: .*differs"):
        TransferEngine(None, backend="cuda", runtime=fake, driver=driver, sm_copy=True)
    assert len(fake.destroyed_streams) == streams + 3  # nothing leaked


def test_without_a_driver_or_host_mapping_the_path_is_off(fake, driver):
    eng = TransferEngine(None, backend="cuda", runtime=fake, sm_copy="auto")  # injected runtime, no driver
    try:
        assert eng._cuda.sm_mode == "off" and "no driver module" in eng._cuda.sm_reason
    finally:
        eng.close()
    fake.device_attrs[cudaDeviceAttr.cudaDevAttrCanUseHostPointerForRegisteredMem] = 0
    with pytest.raises(CudaError, match="CanUseHostPointerForRegisteredMem"):
        TransferEngine(None, backend="cuda", runtime=fake, driver=driver, sm_copy="force")
    assert not driver.images  # nothing was loaded


@pytest.mark.parametrize("value, match", [("yes", "sm_copy must be"), (0.5, "sm_copy must be")])
def test_bad_sm_copy_values(fake, driver, value, match):
    with pytest.raises(InvalidArgumentError, match=match):
        TransferEngine(None, backend="cuda", runtime=fake, driver=driver, sm_copy=value)


@pytest.mark.parametrize("ctas", [0, 1025, True, 2.0])
def test_bad_sm_ctas(fake, driver, ctas):
    with pytest.raises(InvalidArgumentError, match="sm_ctas"):
        TransferEngine(None, backend="cuda", runtime=fake, driver=driver, sm_copy="auto", sm_ctas=ctas)


def test_a_bad_block_id_never_reaches_the_kernel(cuda_engine, fake, driver, make_handle, rng):
    eng = cuda_engine(driver=driver, sm_copy="force")
    launches = len(driver.launches)
    host, dev = _pools(fake, rng)
    src, dst = BlockPool.from_array(host), BlockPool.from_array(dev)
    for pairs in ([[0, 64]], [[64, 0]], [[-1, 0]], [[0, 2**40]]):
        with pytest.raises(InvalidArgumentError):
            eng.submit(make_handle(), src, dst, pairs)
    assert len(driver.launches) == launches and eng.pending == 0


def test_addresses_outside_the_pools_are_refused_before_launch(cuda_engine, fake, driver, make_handle, rng):
    """A second check on the final addresses: here the pool's recorded extents are cut short, as if
    the plan had produced a copy outside the pool."""
    eng = cuda_engine(driver=driver, sm_copy="force")
    launches = len(driver.launches)
    host, dev = _pools(fake, rng)
    src, dst = BlockPool.from_array(host), BlockPool.from_array(dev)
    assert eng.submit(make_handle(), src, dst, [[0, 0]]).wait(10)  # prepares both pools
    starts, ends = dst.transfer_cache.cuda_mapped[0]
    dst.transfer_cache.cuda_mapped[0] = (starts, ends - 4096 * 64)  # the last layer is "outside"
    free_before = sum(len(v) for v in eng._cuda._tables._free.values())
    with pytest.raises(InvalidArgumentError, match="outside the destination pool; nothing was launched"):
        eng.submit(make_handle(), src, dst, [[1, 1]])
    assert len(driver.launches) == launches + 1 and eng.pending == 0
    assert sum(len(v) for v in eng._cuda._tables._free.values()) == free_before  # not leaked


def test_pageable_pools_are_never_given_to_the_kernel(cuda_engine, fake, driver, make_handle, rng):
    cal = Calibration(cells={"h2d": ((1, 1, CopyChoice("sm")),)})
    eng = cuda_engine(driver=driver, sm_copy="auto", auto_pin=False, calibration=cal)
    _, dev = _pools(fake, rng)
    host = np.ones((2, 64, 4096), np.uint8)  # pageable, and not registered (auto_pin=False)
    launches = len(driver.launches)
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev), [[0, 0], [5, 9]]).wait(10)
    assert h.completed and len(driver.launches) == launches and eng._cuda.jobs_by_path["dma"] == 1
    forced = cuda_engine(driver=FakeDriver(fake), sm_copy="force", auto_pin=False)
    with pytest.raises(InvalidArgumentError, match="pageable host memory"):
        forced.submit(make_handle(), BlockPool.from_array(host), BlockPool.from_array(dev), [[0, 0]])
    assert forced.pending == 0


def test_a_failed_launch_fails_the_job_and_the_engine_goes_on(cuda_engine, fake, driver, make_handle, rng):
    eng = cuda_engine(driver=driver, sm_copy="force")
    host, dev = _pools(fake, rng)
    src, dst = BlockPool.from_array(host), BlockPool.from_array(dev)
    driver.launch_fail.append(CUresult.CUDA_ERROR_ILLEGAL_ADDRESS)
    h = make_handle()
    job = eng.submit(h, src, dst, [[1, 2]])
    assert job.wait(10) and h.failed
    assert "cuLaunchKernel (SM copy) failed: CUDA_ERROR_ILLEGAL_ADDRESS" in h.error_text
    h = make_handle()
    assert eng.submit(h, src, dst, [[3, 4]]).wait(10) and h.completed
    assert eng.wait_idle(10) and eng.pending == 0


def test_a_thread_without_a_context_is_bound_and_the_launch_retried(cuda_engine, fake, driver, make_handle, rng):
    eng = cuda_engine(driver=driver, sm_copy="force")
    host, dev = _pools(fake, rng)
    driver.drop_context()
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), BlockPool.from_array(dev), [[1, 2]]).wait(10) and h.completed
    assert not driver.errors


def test_close_unloads_the_kernel(fake, driver):
    eng = TransferEngine(None, backend="cuda", runtime=fake, driver=driver, sm_copy="force")
    assert driver.modules
    assert eng.close(timeout=10)
    assert not driver.modules and driver.calls[-1] == "cuModuleUnload"
