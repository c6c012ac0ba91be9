"""TransferEngine with the host backend: byte-exact copies, validation before any copy,
failures reaching the handle, backpressure, close."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from transfer_helpers import FakeHandle, random_pairs

from kvsched.errors import InvalidArgumentError, KvschedError, ProtocolError
from kvsched.pool import BlockPool
from kvsched.protocol import Decision
from kvsched.transfer.cudart import cuda_available
from kvsched.transfer.engine import TransferEngine
from kvsched.transfer.errors import CudaError, TransferEngineClosedError, TransferQueueFullError

pytestmark = pytest.mark.timeout(120)


def _random(rng, shape, dtype=np.uint8):
    """Random bytes viewed as ``dtype``, with exactly ``shape``."""
    itemsize = np.dtype(dtype).itemsize
    raw = rng.integers(0, 256, size=tuple(shape[:-1]) + (shape[-1] * itemsize,), dtype=np.uint8)
    return raw.view(dtype)


def _finish(job, handle, timeout=10):
    assert job.wait(timeout), f"{job} did not finish"
    assert handle.marked.is_set()
    return job


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("block_bytes", [16, 4096, 96 * 1024])
@pytest.mark.parametrize("count", [1, 7, 200])
def test_scattered_blocks_byte_exact(host_engine, make_handle, rng, block_bytes, count):
    layers, n = 3, 256
    src = _random(rng, (layers, n, block_bytes))
    dst = _random(rng, (layers, n, block_bytes))
    before = dst.copy()
    pairs = random_pairs(rng, n, n, count)
    eng = host_engine()
    h = make_handle()
    job = _finish(eng.submit(h, src=BlockPool.from_array(src), dst=BlockPool.from_array(dst), pairs=pairs), h)
    assert h.completed and job.ok
    expected = before.copy()
    expected[:, pairs[:, 1]] = src[:, pairs[:, 0]]
    np.testing.assert_array_equal(dst, expected)  # copied blocks exact, every other byte untouched


def test_contiguous_runs_are_coalesced(host_engine, make_handle, rng):
    src = _random(rng, (2, 64, 32))
    dst = np.zeros_like(src)
    pairs = np.array([[i, i + 10] for i in range(5, 25)] + [[40, 0], [41, 1], [50, 3]])
    eng = host_engine()
    h = make_handle()
    job = _finish(eng.submit(h, BlockPool.from_array(src), BlockPool.from_array(dst), pairs), h)
    assert job.num_copies == 2 * 3  # layers x runs: [5..24]->[15..34], [40,41]->[0,1], [50]->[3]
    np.testing.assert_array_equal(dst[:, 15:35], src[:, 5:25])
    np.testing.assert_array_equal(dst[:, [0, 1, 3]], src[:, [40, 41, 50]])


@pytest.mark.parametrize("block_dim", [0, 1])
def test_vllm_layouts_and_layer_subsets(host_engine, make_handle, rng, block_dim):
    # block_dim=1: vLLM FlashAttention (2, N, block, heads, dim); 0: FlashInfer (N, 2, ...)
    n, layers = 48, 4
    shape = (2, n, 16, 2, 4) if block_dim == 1 else (n, 2, 16, 2, 4)
    src = [_random(rng, shape, np.float16) for _ in range(layers)]
    dst = [np.zeros(shape, np.float16) for _ in range(layers)]
    pairs = random_pairs(rng, n, n, 30)
    eng = host_engine()
    h = make_handle()
    job = eng.submit(
        h,
        BlockPool.from_layers(src, block_dim=block_dim),
        BlockPool.from_layers(dst, block_dim=block_dim),
        pairs,
        layers=[0, 3],
    )
    _finish(job, h)
    assert h.completed
    for layer in range(layers):
        if layer in (0, 3):
            got = dst[layer].take(pairs[:, 1], axis=block_dim)
            want = src[layer].take(pairs[:, 0], axis=block_dim)
            np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
            untouched = np.setdiff1d(np.arange(n), pairs[:, 1])
            assert not dst[layer].take(untouched, axis=block_dim).any()
        else:
            assert not dst[layer].any(), f"layer {layer} was not requested but changed"


def test_host_and_vllm_layouts_between_each_other(host_engine, make_handle, rng):
    # a (layers, 2, N, ...) host array and per-layer (2, N, ...) arrays split blocks the same way
    n = 20
    host = _random(rng, (3, 2, n, 64))
    per_layer = [np.zeros((2, n, 64), np.uint8) for _ in range(3)]
    pairs = random_pairs(rng, n, n, 10)
    eng = host_engine()
    h = make_handle()
    _finish(eng.submit(h, BlockPool.from_array(host, block_dim=2), BlockPool.from_layers(per_layer, block_dim=1), pairs), h)
    for layer in range(3):
        np.testing.assert_array_equal(per_layer[layer][:, pairs[:, 1]], host[layer][:, pairs[:, 0]])


def test_byte_pools_match_any_dtype(host_engine, make_handle, rng):
    # numpy has no bfloat16: a uint8 staging pool must be able to hold any dtype's blocks
    src = _random(rng, (1, 8, 16), np.float16)
    dst = np.zeros((1, 8, 32), np.uint8)
    eng = host_engine()
    h = make_handle()
    _finish(eng.submit(h, BlockPool.from_array(src), BlockPool.from_array(dst), [[2, 5]]), h)
    np.testing.assert_array_equal(dst[0, 5], src[0, 2].view(np.uint8))


def test_strided_pool_not_dense(host_engine, make_handle, rng):
    src_mem = _random(rng, (2, 30, 48))
    dst_mem = np.zeros((2, 30, 48), np.uint8)
    src = BlockPool.from_array(src_mem[:, :, :32])  # 32-byte blocks, 48-byte stride
    dst = BlockPool.from_array(dst_mem[:, :, :32])
    assert not src.is_dense
    pairs = np.array([[0, 1], [1, 2], [2, 3], [29, 0]])
    eng = host_engine()
    h = make_handle()
    job = _finish(eng.submit(h, src, dst, pairs), h)
    assert job.num_copies == 2 * 4  # not dense: one copy per block
    np.testing.assert_array_equal(dst_mem[:, [1, 2, 3, 0], :32], src_mem[:, [0, 1, 2, 29], :32])
    assert not dst_mem[:, :, 32:].any(), "padding between blocks was written"


def test_many_concurrent_jobs(host_engine, make_handle, rng):
    layers, n, bb = 2, 512, 1024
    src = _random(rng, (layers, n, bb))
    dst = np.zeros_like(src)
    sp, dp = BlockPool.from_array(src), BlockPool.from_array(dst)
    eng = host_engine(workers=3)
    perm = rng.permutation(n)
    chunks = np.array_split(perm, 128)  # 128 jobs, disjoint destinations
    jobs, handles = [], []
    lock = threading.Lock()

    def submitter(part):
        for dst_ids in part:
            pairs = np.stack([rng_local.integers(0, n, dst_ids.size), dst_ids], axis=1)
            h = make_handle()
            job = eng.submit(h, sp, dp, pairs)
            with lock:
                jobs.append((job, pairs))
                handles.append(h)

    rng_local = np.random.default_rng(7)
    threads = [threading.Thread(target=submitter, args=(chunks[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert eng.wait_idle(30)
    assert len(jobs) == 128 and all(h.completed for h in handles)
    for job, pairs in jobs:
        np.testing.assert_array_equal(dst[:, pairs[:, 1]], src[:, pairs[:, 0]])
    stats = eng.stats()
    assert stats["completed"] == 128 and stats["failed"] == 0 and stats["pending"] == 0
    assert stats["bytes"] == layers * n * bb


def test_big_job_is_split_over_workers(host_engine, make_handle, rng):
    src = _random(rng, (8, 16, 65536))
    dst = np.zeros_like(src)
    seen = []
    eng = host_engine(workers=4, split_bytes=1 << 20, fault_hook=lambda job: seen.append(threading.get_ident()))
    h = make_handle()
    pairs = random_pairs(rng, 16, 16, 16)
    _finish(eng.submit(h, BlockPool.from_array(src), BlockPool.from_array(dst), pairs), h)
    assert h.completed and len(seen) == 4  # one part per worker
    np.testing.assert_array_equal(dst[:, pairs[:, 1]], src[:, pairs[:, 0]])


def test_single_layer_job_is_split_by_runs(host_engine, make_handle, rng):
    src = _random(rng, (1, 128, 65536))
    dst = np.zeros_like(src)
    seen = []
    eng = host_engine(workers=4, split_bytes=1 << 20, fault_hook=lambda job: seen.append(1))
    h = make_handle()
    pairs = random_pairs(rng, 128, 128, 100)
    _finish(eng.submit(h, BlockPool.from_array(src), BlockPool.from_array(dst), pairs), h)
    assert h.completed and len(seen) == 4
    expected = np.zeros_like(src)
    expected[:, pairs[:, 1]] = src[:, pairs[:, 0]]
    np.testing.assert_array_equal(dst, expected)


def test_split_parts_cover_the_job_exactly(rng):
    from kvsched.transfer.host import _split
    from kvsched.transfer.plan import build_plan

    pool = BlockPool.from_array(np.zeros((1, 300, 8), np.uint8))
    other = BlockPool.from_array(np.zeros((1, 300, 8), np.uint8))
    for parts in (1, 2, 3, 4, 7):
        free_dst = rng.permutation(np.setdiff1d(np.arange(300), np.arange(100, 140)))[:210]
        pairs = np.concatenate([
            np.stack([np.arange(40), np.arange(100, 140)], 1),  # one long run
            np.stack([rng.integers(0, 300, 210), free_dst], 1),
        ])
        plan = build_plan(pool, other, pairs)
        chunks = _split(plan, parts)
        assert 1 <= len(chunks) <= parts
        assert sum(int(c.runs[:, 2].sum()) for c in chunks) == plan.num_blocks
        got = sorted(zip(np.concatenate([c.src_ids for c in chunks]).tolist(), np.concatenate([c.dst_ids for c in chunks]).tolist()))
        assert got == sorted(map(tuple, pairs.tolist()))
        for c in chunks:  # each part's runs describe exactly its ids
            s = np.concatenate([np.arange(a, a + n) for a, _, n in c.runs])
            np.testing.assert_array_equal(s, c.src_ids)


def test_short_runs_are_not_split(host_engine, make_handle, rng):
    src = _random(rng, (4, 1024, 4096))
    seen = []
    eng = host_engine(workers=4, split_bytes=1 << 20, fault_hook=lambda job: seen.append(1))
    h = make_handle()
    _finish(eng.submit(h, BlockPool.from_array(src), BlockPool.from_array(np.zeros_like(src)), random_pairs(rng, 1024, 1024, 900)), h)
    assert h.completed and len(seen) == 1


def test_empty_pairs_complete_at_once(host_engine, make_handle):
    a = np.zeros((1, 4, 8), np.uint8)
    eng = host_engine()
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(a), BlockPool.from_array(a.copy()), np.zeros((0, 2), np.int64))
    assert job.done() and h.completed and job.nbytes == 0


# ----------------------------------------------------------------------------- failures


def test_injected_failure_marks_handle_failed_with_reason(host_engine, make_handle, rng):
    src = _random(rng, (1, 16, 64))
    dst = np.zeros_like(src)
    sp, dp = BlockPool.from_array(src), BlockPool.from_array(dst)

    def hook(job):
        if job.request_id == "doomed":
            raise OSError("injected DMA fault")

    eng = host_engine(fault_hook=hook)
    bad = FakeHandle(request_id="doomed")
    good = make_handle()
    j1 = eng.submit(bad, sp, dp, [[0, 0]])
    j2 = eng.submit(good, sp, dp, [[1, 1]])
    _finish(j1, bad)
    _finish(j2, good)
    assert bad.failed and good.completed
    assert "injected DMA fault" in bad.error_text and "OSError" in bad.error_text
    assert "doomed" in bad.error_text and str(bad.uuid) in bad.error_text
    assert isinstance(bad.marks[0], KvschedError)
    assert j1.error and "injected DMA fault" in j1.error and not j1.ok
    assert not dst[0, 0].any() and (dst[0, 1] == src[0, 1]).all()
    assert eng.stats()["failed"] == 1 and eng.stats()["completed"] == 1


def test_mark_failure_is_logged_not_fatal(host_engine, make_handle, caplog):
    a = np.ones((1, 4, 8), np.uint8)
    eng = host_engine()
    h = make_handle()
    h.mark_complete()  # someone else marked it already: the engine's mark will raise
    with caplog.at_level(logging.WARNING, logger="kvsched"):
        job = eng.submit(h, BlockPool.from_array(a), BlockPool.from_array(np.zeros_like(a)), [[0, 1]])
        assert job.wait(10)
    assert "could not mark" in caplog.text
    h2 = make_handle()  # the engine still works
    _finish(eng.submit(h2, BlockPool.from_array(a), BlockPool.from_array(np.zeros_like(a)), [[0, 1]]), h2)
    assert h2.completed


def _bad_requests(rng):
    src = _random(rng, (2, 8, 32))
    other_size = np.zeros((2, 8, 16), np.uint8)
    other_pieces = np.zeros((2, 2, 8, 16), np.uint8)  # 32-byte blocks in 2 pieces
    other_dtype = np.zeros((2, 8, 16), np.uint16)  # 32-byte blocks, other dtype
    three_layers = np.zeros((3, 8, 32), np.uint8)
    readonly = np.zeros((2, 8, 32), np.uint8)
    readonly.flags.writeable = False
    ok_dst = np.zeros((2, 8, 32), np.uint8)
    S = BlockPool.from_array(src)
    D = BlockPool.from_array(ok_dst)
    return ok_dst, [
        ("negative src id", dict(src=S, dst=D, pairs=[[0, 0], [-1, 1]]), InvalidArgumentError),
        ("src id too large", dict(src=S, dst=D, pairs=[[8, 0]]), InvalidArgumentError),
        ("negative dst id", dict(src=S, dst=D, pairs=[[0, -3]]), InvalidArgumentError),
        ("dst id too large", dict(src=S, dst=D, pairs=[[1, 2], [0, 99]]), InvalidArgumentError),
        ("dst written twice", dict(src=S, dst=D, pairs=[[1, 2], [3, 2]]), InvalidArgumentError),
        ("pairs shape", dict(src=S, dst=D, pairs=[1, 2, 3]), InvalidArgumentError),
        ("float ids", dict(src=S, dst=D, pairs=[[0.0, 1.0]]), TypeError),
        ("block size", dict(src=S, dst=BlockPool.from_array(other_size), pairs=[[0, 0]]), InvalidArgumentError),
        ("pieces", dict(src=S, dst=BlockPool.from_array(other_pieces, block_dim=2), pairs=[[0, 0]]), InvalidArgumentError),
        ("dtype", dict(src=BlockPool.from_array(other_dtype.view(np.float16)), dst=BlockPool.from_array(other_dtype), pairs=[[0, 0]]), InvalidArgumentError),
        ("layer out of range", dict(src=S, dst=D, pairs=[[0, 0]], layers=[0, 2]), InvalidArgumentError),
        ("negative layer", dict(src=S, dst=D, pairs=[[0, 0]], layers=[-1]), InvalidArgumentError),
        ("repeated layer", dict(src=S, dst=D, pairs=[[0, 0]], layers=[1, 1]), InvalidArgumentError),
        ("layer count", dict(src=S, dst=BlockPool.from_array(three_layers), pairs=[[0, 0]]), InvalidArgumentError),
        ("read-only dst", dict(src=S, dst=BlockPool.from_array(readonly), pairs=[[0, 0]]), InvalidArgumentError),
        ("same block both ways", dict(src=D, dst=D, pairs=[[0, 1], [1, 2]]), InvalidArgumentError),
        ("not a pool", dict(src=src, dst=D, pairs=[[0, 0]]), TypeError),
    ]


def test_bad_requests_raise_before_anything_is_copied(host_engine, make_handle, rng):
    eng = host_engine()
    dst, cases = _bad_requests(rng)
    for name, kwargs, exc in cases:
        h = make_handle(request_id=f"bad-{name}")
        with pytest.raises(exc) as info:
            eng.submit(h, **kwargs)
        assert h.request_id in str(info.value), f"{name}: message does not name the request"
        assert not h.marks, f"{name}: handle was marked"
    assert eng.wait_idle(5)
    assert not dst.any(), "a rejected request copied bytes"
    assert eng.stats()["submitted"] == 0


@pytest.mark.parametrize("decision", [Decision.CANCEL, None])
def test_cancelled_or_undecided_handle_rejected(host_engine, make_handle, decision):
    a = np.ones((1, 4, 8), np.uint8)
    b = np.zeros_like(a)
    eng = host_engine()
    h = make_handle(decision=decision)
    with pytest.raises(ProtocolError, match="EXECUTE"):
        eng.submit(h, BlockPool.from_array(a), BlockPool.from_array(b), [[0, 0]])
    assert not h.marks and not b.any()
    with pytest.raises(TypeError):
        eng.submit(object(), BlockPool.from_array(a), BlockPool.from_array(b), [[0, 0]])


def test_same_handle_twice_in_flight_rejected(host_engine, make_handle):
    a = np.ones((1, 4, 8), np.uint8)
    gate = threading.Event()
    eng = host_engine()
    h = make_handle()
    sp, dp = BlockPool.from_array(a), BlockPool.from_array(np.zeros_like(a))
    job = eng.submit(h, sp, dp, [[0, 0]], compute_event=gate)
    with pytest.raises(ProtocolError, match="already"):
        eng.submit(h, sp, dp, [[1, 1]])
    gate.set()
    _finish(job, h)
    assert h.completed


def test_cuda_pool_needs_cuda_backend(host_engine, make_handle):
    dev = BlockPool.from_pointers([0x7F0000000000], 4, 64, device="cuda:0")
    host = BlockPool.from_array(np.zeros((1, 4, 64), np.uint8))
    eng = host_engine()
    h = make_handle()
    with pytest.raises(InvalidArgumentError, match="cuda"):
        eng.submit(h, host, dev, [[0, 0]])
    assert not h.marks


# ----------------------------------------------------------------------------- non-blocking


def test_submit_returns_before_the_copy(host_engine, make_handle):
    a = np.ones((1, 4, 8), np.uint8)
    eng = host_engine(fault_hook=lambda job: time.sleep(0.3))
    h = make_handle()
    t0 = time.perf_counter()
    job = eng.submit(h, BlockPool.from_array(a), BlockPool.from_array(np.zeros_like(a)), [[0, 0]])
    assert time.perf_counter() - t0 < 0.1
    assert not job.done()
    _finish(job, h)


def test_host_events_gate_the_copy(host_engine, make_handle):
    a = np.full((1, 4, 8), 7, np.uint8)
    b = np.zeros_like(a)
    gate = threading.Event()
    eng = host_engine()
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(a), BlockPool.from_array(b), [[2, 3]], compute_event=gate)
    time.sleep(0.05)
    assert not job.done() and not b.any(), "copied before its event was set"
    gate.set()
    _finish(job, h)
    assert (b[0, 3] == 7).all()
    with pytest.raises(InvalidArgumentError):
        eng.submit(make_handle(), BlockPool.from_array(a), BlockPool.from_array(b), [[0, 0]], compute_event=42)


def test_event_timeout_fails_the_job(host_engine, make_handle):
    a = np.ones((1, 4, 8), np.uint8)
    eng = host_engine(event_timeout=0.05)
    h = make_handle()
    job = eng.submit(h, BlockPool.from_array(a), BlockPool.from_array(np.zeros_like(a)), [[0, 0]], wait_event=threading.Event())
    _finish(job, h)
    assert h.failed and "TimeoutError" in h.error_text


def test_backpressure_raises_instead_of_blocking(host_engine, make_handle):
    a = np.ones((1, 8, 8), np.uint8)
    sp, dp = BlockPool.from_array(a), BlockPool.from_array(np.zeros_like(a))
    gate = threading.Event()
    eng = host_engine(max_pending=2)
    jobs = [eng.submit(make_handle(), sp, dp, [[i, i]], compute_event=gate) for i in range(2)]
    h = make_handle()
    t0 = time.perf_counter()
    with pytest.raises(TransferQueueFullError, match="max_pending=2"):
        eng.submit(h, sp, dp, [[5, 5]])
    assert time.perf_counter() - t0 < 0.05
    assert not h.marks  # left to the caller: retry later or mark failed
    assert eng.stats()["rejected"] == 1
    gate.set()
    for j in jobs:
        assert j.wait(10)
    _finish(eng.submit(h, sp, dp, [[5, 5]]), h)  # the retry goes through
    assert h.completed


# ----------------------------------------------------------------------------- lifecycle


def test_close_waits_for_inflight_and_is_idempotent(make_handle):
    a = np.ones((1, 4, 8), np.uint8)
    eng = TransferEngine(None, backend="host", workers=1, fault_hook=lambda job: time.sleep(0.2))
    handles = [make_handle() for _ in range(3)]
    for i, h in enumerate(handles):
        eng.submit(h, BlockPool.from_array(a), BlockPool.from_array(np.zeros_like(a)), [[i, i]])
    n_threads = threading.active_count()
    assert eng.close(timeout=10)
    assert all(h.completed for h in handles), "close returned before the copies landed"
    assert eng.close() and eng.close(timeout=0)
    assert threading.active_count() < n_threads
    with pytest.raises(TransferEngineClosedError):
        eng.submit(make_handle(), BlockPool.from_array(a), BlockPool.from_array(np.zeros_like(a)), [[0, 0]])


def test_context_manager(make_handle):
    a = np.ones((1, 4, 8), np.uint8)
    b = np.zeros_like(a)
    h = make_handle()
    with TransferEngine(None, backend="host") as eng:
        eng.submit(h, BlockPool.from_array(a), BlockPool.from_array(b), [[0, 0]])
    assert h.completed and (b[0, 0] == 1).all()


def test_unknown_options_and_backend():
    with pytest.raises(TypeError, match="bogus"):
        TransferEngine(None, backend="host", bogus=1)
    with pytest.raises(InvalidArgumentError):
        TransferEngine(None, backend="tpu")


@pytest.mark.skipif(cuda_available()[0], reason="a CUDA device is usable here")
def test_auto_picks_host_without_gpu_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="kvsched"):
        eng = TransferEngine(None)
    try:
        assert eng.backend == "host"
        assert "no usable CUDA device" in eng.backend_reason
        assert "backend=host" in caplog.text and "no usable CUDA device" in caplog.text
    finally:
        eng.close()
    with pytest.raises(CudaError, match="no usable CUDA device"):
        TransferEngine(None, backend="cuda")


# ----------------------------------------------------------------------------- with a scheduler


def test_with_reference_scheduler(rng):
    reference = pytest.importorskip("kvsched.testing")
    from kvsched.protocol import TransferKind

    import uuid

    src = _random(rng, (2, 16, 64))
    dst = np.zeros_like(src)
    with reference.ReferenceScheduler(max_inflight=4) as s:
        w, t = s.worker, s.transfer
        w.create_slot("r1")
        ops = [uuid.uuid4(), uuid.uuid4()]
        for u in ops:
            w.enqueue("r1", u, TransferKind.LOAD)
        handles = [t.schedule("r1", u) for u in ops]
        assert all(h.wait(timeout=5) == Decision.EXECUTE for h in handles)
        with TransferEngine(s, backend="host", fault_hook=lambda job: _fail_if(job, ops[1])) as eng:
            eng.submit(handles[0], BlockPool.from_array(src), BlockPool.from_array(dst), [[3, 4]])
            eng.submit(handles[1], BlockPool.from_array(src), BlockPool.from_array(dst), [[5, 6]])
        deadline = time.monotonic() + 5
        while not w.is_complete("r1") and time.monotonic() < deadline:
            time.sleep(0.01)
        status = w.slot_status("r1")
        assert w.is_complete("r1") and status.completed == 1 and status.failed == 1
        assert any("injected" in msg for _, msg in status.errors)
        np.testing.assert_array_equal(dst[:, 4], src[:, 3])


def _fail_if(job, bad_uuid):
    if job.uuid == bad_uuid:
        raise RuntimeError("injected failure")


def test_host_transfer_bench_checks_its_own_copy(monkeypatch):
    """The benchmark's byte-exact check looks at kvsched's copy, not at the per-block loop's,
    which wrote the same destination: a path that copies nothing is caught."""
    from kvsched.bench import transfer_bench as bench
    from kvsched.transfer import host

    result = bench.run_transfer_bench(backend="host", block_sizes=[4096], total_bytes=1 << 18, repeats=1)
    assert result["rows"][0]["kvsched_gbps"] > 0
    monkeypatch.setattr(host, "_copy", lambda plan, part: None)
    with pytest.raises(RuntimeError, match="not byte-exact"):
        bench.run_transfer_bench(backend="host", block_sizes=[4096], total_bytes=1 << 18, repeats=1)


# -- inline_bytes: small jobs copied on the submitting thread ------------------------------------


def _inline_setup(inline_bytes, **kw):
    import uuid as _uuid

    import numpy as _np

    import kvsched as _k

    s = _k.Scheduler()
    a = _np.arange(2 * 8 * 64, dtype=_np.uint8).reshape(2, 8, 64)
    b = _np.zeros_like(a)
    eng = _k.TransferEngine(s, backend="host", inline_bytes=inline_bytes, **kw)

    def handle():
        try:
            s.worker.create_slot("r")
        except _k.SlotExistsError:
            pass
        u = _uuid.uuid4()
        s.worker.enqueue("r", u, _k.TransferKind.STORE)
        h = s.transfer.schedule("r", u)
        assert h.wait(1.0) == _k.Decision.EXECUTE
        return h

    return s, eng, a, b, _k.BlockPool.from_array(a), _k.BlockPool.from_array(b), handle


def test_inline_small_job_is_done_when_submit_returns():
    s, eng, a, b, pa, pb, handle = _inline_setup(1 << 10)
    h = handle()
    job = eng.submit(h, pa, pb, pairs=[(0, 1), (2, 3)])
    assert job.done() and job.ok and h.outcome == "completed"  # no thread involved
    assert (b[:, 1] == a[:, 0]).all() and (b[:, 3] == a[:, 2]).all()
    assert eng.stats()["completed"] == 1 and eng.pending == 0
    eng.close(5.0)
    s.close()


def test_inline_never_for_big_jobs_events_or_fault_hooks():
    import threading

    s, eng, a, b, pa, pb, handle = _inline_setup(64)  # one 64-byte block per layer: 128 bytes
    gate = threading.Event()
    h = handle()
    job = eng.submit(h, pa, pb, pairs=[(0, 1)], compute_event=gate)  # an event: a worker waits
    assert not job.done()
    gate.set()
    assert job.wait(5.0) and job.ok
    h2 = handle()
    job2 = eng.submit(h2, pa, pb, pairs=[(0, 2)], layers=[0])  # 64 bytes, no event: inline
    assert job2.done()
    eng.close(5.0)
    hooked = []
    s2, eng2, _, _, pa2, pb2, handle2 = _inline_setup(1 << 20, fault_hook=hooked.append)
    assert eng2.submit(handle2(), pa2, pb2, pairs=[(0, 1)]).wait(5.0)
    assert len(hooked) == 1  # the test seam runs on a worker thread, as always
    eng2.close(5.0)
    s.close()
    s2.close()


def test_inline_bytes_is_range_checked():
    import kvsched as _k

    with pytest.raises(_k.InvalidArgumentError, match="inline_bytes"):
        _k.TransferEngine(None, backend="host", inline_bytes=-1)
    with pytest.raises(TypeError, match="inline_bytes"):
        _k.TransferEngine(None, backend="host", inline_bytes=1.5)


def test_job_names_its_operation_after_the_handle_is_released():
    # A job reads its handle's request id and uuid lazily (not on the submit path) and keeps
    # them when it finishes and drops the handle; the same handle cannot be submitted twice.
    import uuid

    from kvsched import Scheduler
    from kvsched.protocol import TransferKind

    s = Scheduler(num_layers=1)
    src_arr = np.arange(4 * 8, dtype=np.uint8).reshape(1, 4, 8)
    dst_arr = np.zeros((1, 4, 8), dtype=np.uint8)
    src, dst = BlockPool.from_array(src_arr), BlockPool.from_array(dst_arr)
    engine = TransferEngine(s, backend="host")
    try:
        u = uuid.uuid4()
        s.worker.create_slot("req-a")
        s.worker.enqueue("req-a", u, TransferKind.LOAD)
        h = s.transfer.schedule("req-a", u)
        job = engine.submit(h, src, dst, [(1, 2)])
        with pytest.raises(ProtocolError, match="already"):
            engine.submit(h, src, dst, [(1, 3)])
        assert job.wait(10) and job.ok
        assert job.handle is None
        assert job.uuid == u and job.request_id == "req-a"
        assert h.outcome == "completed"
        assert dst_arr[0, 2].tolist() == list(range(8, 16))
        assert dst_arr[0, 3].tolist() == [0] * 8  # the refused second submit copied nothing
    finally:
        engine.close()
        s.close()
