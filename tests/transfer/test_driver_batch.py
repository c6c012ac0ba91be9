"""Batched copies handed to the driver as C arrays (kvsched.transfer.driver_batch), on a CPU-only
machine: the ctypes call runs for real against a C-callable stand-in for ``cuMemcpyBatchAsync``
(fake_cudart.FakeDriver). That the prototype and struct match the real driver is checked against
``cuda.h`` where a CUDA toolkit is installed; that the driver copies right is the GPU tests' job."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading

import numpy as np
import pytest
from fake_cudart import CUresult, FakeDriver, FakeRuntime
from transfer_helpers import c_compiler

from kvsched.pool import BlockPool
from kvsched.transfer.cuda import _chunk_bounds
from kvsched.transfer.cudart import DeviceBuffer, pinned_empty
from kvsched.transfer.driver_batch import ABI_VERSION, CUmemcpyAttributes, DriverBatchCopier, c_array
from kvsched.transfer.engine import TransferEngine
from kvsched.transfer.errors import CudaError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def driver(fake):
    drv = FakeDriver(fake)
    yield drv
    assert drv.errors == [], f"the fake driver saw bad arguments: {drv.errors}"


@pytest.fixture
def engine(cuda_engine, driver):
    """cuda_engine with the stand-in driver, so the C-array batch path is the one used."""

    def factory(**kwargs):
        kwargs.setdefault("driver", driver)
        return cuda_engine(**kwargs)

    return factory


def _read(buf: DeviceBuffer) -> np.ndarray:
    raw = (ctypes.c_ubyte * buf.nbytes).from_address(buf.ptr)
    return np.frombuffer(raw, dtype=np.uint8).reshape(buf.shape).copy()


@pytest.mark.parametrize("count,limit", [(0, 4096), (1, 4096), (31, 4096), (32, 4096), (33, 4096),
                                         (1000, 4096), (16384, 4096), (500, 100), (10, 1)])
def test_chunk_bounds_cover_every_copy_once_and_double_up_to_the_limit(count, limit):
    bounds = _chunk_bounds(count, limit)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(count))
    sizes = [b - a for a, b in bounds]
    assert all(0 < n <= limit for n in sizes)
    assert not sizes or sizes[0] == min(32, limit, count)
    full = sizes[:-1]  # every call but the last is full: 32, 64, ... then the limit
    assert all(b == min(2 * a, limit) for a, b in zip(full, full[1:]))


def test_copier_passes_c_arrays_and_reports_the_failed_copy(fake, driver):
    copier = DriverBatchCopier(driver)
    assert driver.lookups == [(b"cuMemcpyBatchAsync", ABI_VERSION, 1)]  # 12.8 ABI, legacy stream
    fake.bound_threads.add(threading.get_ident())
    stream = int(fake.cudaStreamCreateWithFlags(1)[1])
    src = np.arange(4096, dtype=np.uint8)
    order = np.random.default_rng(3).permutation(64).astype(np.int64) * 64
    for kind in ("numpy", "list"):
        dst = np.zeros_like(src)
        srcs = int(src.ctypes.data) + order
        dsts = int(dst.ctypes.data) + order[::-1]
        sizes = np.full(64, 64, dtype=np.int64)
        if kind == "list":
            srcs, dsts, sizes = srcs.tolist(), dsts.tolist(), sizes.tolist()
        (d, dk), (s, sk), (n, nk) = c_array(dsts), c_array(srcs), c_array(sizes)
        assert copier(d, s, n, 64, stream)[0] == 0
        for k in range(64):
            assert np.array_equal(dst[order[::-1][k] : order[::-1][k] + 64], src[order[k] : order[k] + 64])
        assert copier(d + 8 * 60, s + 8 * 60, n + 8 * 60, 4, stream)[0] == 0  # a chunk: the last 4
        assert driver.batches[-2:] == [64, 4]
    driver.fail_at.append((CUresult.CUDA_ERROR_ILLEGAL_ADDRESS, 17))
    assert copier(d, s, n, 64, stream) == (700, 17)
    driver.fail_at.append((CUresult.CUDA_ERROR_INVALID_VALUE, None))  # the driver writes no index
    assert copier(d, s, n, 64, stream) == (1, 2**64 - 1)
    assert copier.error_name(700).startswith("CUDA_ERROR_ILLEGAL_ADDRESS")
    with pytest.raises(ValueError, match="1-D integer"):
        c_array(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D integer"):
        c_array(np.zeros(4, dtype=np.float64))
    addr, keep = c_array(np.arange(8, dtype=np.int64)[::2])  # strided: copied to contiguous
    assert list((ctypes.c_int64 * 4).from_address(addr)) == [0, 2, 4, 6]


def test_driver_without_batched_copies_is_refused(fake):
    with pytest.raises(CudaError, match="no cuMemcpyBatchAsync"):
        DriverBatchCopier(FakeDriver(fake, has_batch=False))


@pytest.mark.parametrize("block_bytes", [64, 4096])
def test_engine_round_trip_through_the_driver_path(engine, fake, driver, make_handle, rng, block_bytes):
    eng = engine()
    assert eng.stats()["batch_mode"] == "driver" and eng.batched
    assert "C arrays" in eng.stats()["batch_reason"]
    n = 1200
    host = pinned_empty((2, n, block_bytes), runtime=fake)
    host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
    dev_buf = DeviceBuffer((2, n, block_bytes), runtime=fake)
    hp, dp = BlockPool.from_array(host), BlockPool.from_array(dev_buf)
    pairs = np.stack([rng.permutation(n)[:700], rng.permutation(n)[:700]], axis=1)  # ~700 copies a layer
    driver.batches.clear()
    h = make_handle()
    job = eng.submit(h, hp, dp, pairs)
    assert job.wait(10) and h.completed, h.error_text
    dev = _read(dev_buf)
    for layer in range(2):
        assert np.array_equal(dev[layer, pairs[:, 1]], host[layer, pairs[:, 0]])
    assert sum(driver.batches) == job.num_copies
    assert driver.batches == [b - a for a, b in _chunk_bounds(job.num_copies, eng._cuda.batch_chunk)]
    assert fake.calls["cudaMemcpyBatchAsync"] == 0 and fake.calls["cudaMemcpyAsync"] == 0
    back = pinned_empty(host.shape, runtime=fake)
    h2 = make_handle()
    assert eng.submit(h2, dp, BlockPool.from_array(back), pairs[:, ::-1]).wait(10) and h2.completed
    for layer in range(2):
        assert np.array_equal(back[layer, pairs[:, 0]], host[layer, pairs[:, 0]])


def test_event_waits_come_before_the_driver_batch(engine, fake, make_handle):
    eng = engine()
    host = pinned_empty((1, 64, 32), runtime=fake)
    dev = BlockPool.from_array(DeviceBuffer((1, 64, 32), runtime=fake))
    fake.trace.clear()
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(host), dev, [[0, 0], [2, 2], [4, 4]], wait_event=0xBEE0)
    assert job.wait(10) and h.completed
    h2d = eng.stream("h2d")
    assert [k for k, s in fake.trace if s == h2d] == ["wait", "copy", "record"]


def test_driver_error_fails_the_handle_and_names_the_copy(engine, fake, driver, make_handle):
    eng = engine()
    host = pinned_empty((1, 64, 32), runtime=fake)
    dev = BlockPool.from_array(DeviceBuffer((1, 64, 32), runtime=fake))
    driver.fail_at.append((CUresult.CUDA_ERROR_ILLEGAL_ADDRESS, 1))
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(host), dev, [[0, 0], [2, 2], [4, 4]])
    assert job.wait(10) and h.failed
    assert "cuMemcpyBatchAsync failed (copy 1): CUDA_ERROR_ILLEGAL_ADDRESS" in h.error_text
    h2 = make_handle()  # the engine goes on
    assert eng.submit(h2, BlockPool.from_array(host), dev, [[1, 1], [3, 3]]).wait(10) and h2.completed
    driver.fail_at.append((CUresult.CUDA_ERROR_INVALID_VALUE, 2**64 - 1))  # SIZE_MAX: no one copy
    h3 = make_handle()
    assert eng.submit(h3, BlockPool.from_array(host), dev, [[5, 5], [7, 7]]).wait(10) and h3.failed
    assert "cuMemcpyBatchAsync failed: CUDA_ERROR_INVALID_VALUE" in h3.error_text


def test_a_thread_without_a_current_context_binds_it_and_retries(engine, fake, driver, make_handle):
    eng = engine()
    host = pinned_empty((1, 64, 32), runtime=fake)
    dev = BlockPool.from_array(DeviceBuffer((1, 64, 32), runtime=fake))
    results = []

    def submit_from_new_thread():
        h = make_handle()
        results.append((h, eng.submit(h, BlockPool.from_array(host), dev, [[0, 0], [2, 2]])))

    t = threading.Thread(target=submit_from_new_thread)
    t.start()
    t.join(10)
    assert not t.is_alive() and results, "the submitting thread did not finish"
    h, job = results[0]
    assert job.wait(10) and h.completed  # bound before its first batch
    driver.drop_context()  # another library switched contexts behind our back
    before = fake.calls["cudaFree"]
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), dev, [[1, 1], [3, 3]]).wait(10) and h.completed
    assert fake.calls["cudaFree"] == before + 1  # the refused call was retried after binding


def test_fallback_to_the_bindings_then_the_loop(engine, fake, make_handle):
    eng = engine(driver=FakeDriver(fake, has_batch=False))
    stats = eng.stats()
    assert stats["batch_mode"] == "bindings" and "not driver: CudaError" in stats["batch_reason"]
    broken = FakeDriver(fake)
    broken.fail_at.append((CUresult.CUDA_ERROR_NOT_SUPPORTED, 0))
    eng = engine(driver=broken)
    assert eng.stats()["batch_mode"] == "bindings"
    assert "driver: self-test failed" in eng.stats()["batch_reason"]
    assert engine(driver=None).stats()["batch_mode"] == "bindings"  # stand-in runtime, no driver
    old = FakeRuntime(batch=False)
    eng = TransferEngine(None, backend="cuda", runtime=old, driver=FakeDriver(old, has_batch=False))
    try:
        assert eng.stats()["batch_mode"] == "loop" and not eng.batched
    finally:
        eng.close(timeout=10)
    assert engine(batch=False).stats()["batch_mode"] == "loop"
    assert engine(batch="bindings").stats()["batch_mode"] == "bindings"  # required, though driver works
    with pytest.raises(CudaError, match="batch='driver' but"):
        engine(batch="driver", driver=FakeDriver(fake, has_batch=False))


def _cuda_include() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "include", "cudaTypedefs.h")):
            return os.path.join(root, "include")
    return None


@pytest.mark.skipif(_cuda_include() is None or c_compiler() is None,
                    reason="needs the CUDA toolkit headers (cuda.h) and a C compiler")
def test_struct_and_prototype_match_cuda_h(tmp_path):
    """The ctypes struct has cuda.h's layout, and the declared prototype is the 12.8 one."""
    probe = tmp_path / "probe.c"
    probe.write_text(
        "#include <cuda.h>\n#include <cudaTypedefs.h>\n#include <stdio.h>\n#include <stddef.h>\n"
        "static CUresult fn(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t c, CUmemcpyAttributes *a,\n"
        "                   size_t *ai, size_t na, size_t *f, CUstream st) { return CUDA_SUCCESS; }\n"
        "int main(void) {\n"
        "  PFN_cuMemcpyBatchAsync_v12080 check = fn; (void)check;\n"  # -Werror: prototypes agree
        '  printf("%zu %zu %zu %zu %zu %zu %d\\n", sizeof(CUmemcpyAttributes),\n'
        "    offsetof(CUmemcpyAttributes, srcLocHint), offsetof(CUmemcpyAttributes, dstLocHint),\n"
        "    offsetof(CUmemcpyAttributes, flags), sizeof(CUdeviceptr), sizeof(CUstream),\n"
        "    (int)CU_MEMCPY_SRC_ACCESS_ORDER_STREAM);\n"
        "  return 0;\n}\n"
    )
    exe = tmp_path / "probe"
    subprocess.run([c_compiler(), "-Werror=incompatible-pointer-types", "-I", _cuda_include(), str(probe),
                    "-o", str(exe)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=30).stdout.split()
    assert [int(x) for x in out] == [
        ctypes.sizeof(CUmemcpyAttributes), CUmemcpyAttributes.srcLocHint.offset,
        CUmemcpyAttributes.dstLocHint.offset, CUmemcpyAttributes.flags.offset,
        ctypes.sizeof(ctypes.c_uint64), ctypes.sizeof(ctypes.c_void_p), 1,
    ]


def test_cuda_transfer_bench_runs_on_the_stand_ins(fake):
    """The cuda rows of kvsched-bench's transfer benchmark (three directions, the C-array engine
    beside the Python-list one), run on the stand-ins so its code is exercised without a GPU.
    The figures mean nothing here; the checks are on the shape and on byte-exact copies (the
    benchmark raises if a copy is not)."""
    from kvsched.bench.transfer_bench import format_table, run_transfer_bench

    drv = FakeDriver(fake)
    result = run_transfer_bench(backend="cuda", block_sizes=[4096, 65536], total_bytes=1 << 20,
                                repeats=1, runtime=fake, driver=drv, poll_interval=(1e-5, 1e-4))
    assert drv.errors == []
    assert result["backend"] == "cuda" and result["batch_mode"] == "driver"
    rows = result["rows"]
    assert [(r["direction"], r["block_bytes"]) for r in rows] == [
        (d, s) for s in (4096, 65536) for d in ("h2d", "d2h", "both")]
    for r in rows:
        for key in ("peak_gbps", "kvsched_gbps", "per_block_gbps", "bindings_gbps"):
            assert r[key] > 0
        assert 0 < r["copies"] <= r["blocks"] * (2 if r["direction"] == "both" else 1)  # runs merge
    assert "lists GB/s" in format_table(result)


def test_cuda_transfer_bench_catches_a_path_that_copies_nothing(fake, monkeypatch):
    """The byte-exact check looks at kvsched's own copy: other methods write the same buffers."""
    from kvsched.bench.transfer_bench import run_transfer_bench
    from kvsched.transfer.cuda import CudaBackend

    # Broken only once the engine is built: its self-test would catch it and fall back.
    real = CudaBackend._setup_batch

    def setup_then_break(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        self._launch_driver = lambda *a: None
        return result

    monkeypatch.setattr(CudaBackend, "_setup_batch", setup_then_break)
    with pytest.raises(RuntimeError, match=r"not byte-exact"):
        run_transfer_bench(backend="cuda", block_sizes=[4096], total_bytes=1 << 18, repeats=1,
                           directions=["h2d"], runtime=fake, driver=FakeDriver(fake),
                           poll_interval=(1e-5, 1e-4))


@pytest.mark.parametrize("fail_index,where", [(1, " (copy 1)"), (2**64 - 1, ""), (None, "")])
def test_bindings_path_names_the_failed_copy_only_when_there_is_one(engine, fake, make_handle,
                                                                   fail_index, where):
    """cuda-bindings 12.8/12.9 return (err, failIdx), SIZE_MAX when no one copy failed; 13 (err,)."""
    from fake_cudart import cudaError_t

    eng = engine(batch="bindings")
    host = pinned_empty((1, 64, 32), runtime=fake)
    dev = BlockPool.from_array(DeviceBuffer((1, 64, 32), runtime=fake))
    result = (cudaError_t.cudaErrorInvalidValue,) + (() if fail_index is None else (fail_index,))
    fake.cudaMemcpyBatchAsync = lambda *args: result
    h = make_handle()
    assert eng.submit(h, BlockPool.from_array(host), dev, [[0, 0], [2, 2], [4, 4]]).wait(10) and h.failed
    assert f"cudaMemcpyBatchAsync failed{where}: cudaErrorInvalidValue" in h.error_text
