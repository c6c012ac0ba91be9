"""kvsched-bench's GPU layers (kvsched.bench.gpu_compute) and the cuda engine simulation, on a
real GPU (skipped with the reason elsewhere): the PTX kernel loads and holds the compute stream
for the asked time without blocking the CPU, a store gated on the event after a layer waits for
that layer on the GPU, and a short engine simulation runs with nothing failed."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
from transfer_helpers import FakeHandle

from kvsched.pool import BlockPool
from kvsched.transfer.cudart import DeviceBuffer, pinned_empty
from kvsched.transfer.engine import TransferEngine

pytestmark = [pytest.mark.timeout(180), pytest.mark.gpu]

LAYER_S = 0.2


@pytest.fixture
def compute(gpu):
    from kvsched.bench.gpu_compute import GpuCompute

    with GpuCompute() as c:
        c.start_pass()
        c.layer(0.001)  # warm-up: module and first launch
        c.synchronize()
        yield c


def test_kernel_holds_the_stream_without_blocking_the_cpu(compute):
    compute.start_pass()
    t0 = time.perf_counter()
    compute.layer(LAYER_S)
    launched = time.perf_counter() - t0
    compute.synchronize()
    waited = time.perf_counter() - t0
    (start, end), = compute.layer_spans()
    assert launched < LAYER_S / 4, f"launch blocked the CPU for {launched * 1e3:.0f} ms"
    assert waited >= LAYER_S * 0.9
    assert LAYER_S * 0.95 <= end - start <= LAYER_S * 2, f"kernel ran {end - start:.3f} s"


@pytest.mark.parametrize("gated", [True, False])
def test_store_gated_on_a_layer_event_waits_for_the_layer(compute, gated):
    eng = TransferEngine(None, backend="cuda")
    try:
        dev = BlockPool.from_array(DeviceBuffer((1, 8, 4096)))
        host = BlockPool.from_array(pinned_empty((1, 8, 4096)))
        compute.layer(LAYER_S)
        event = compute.record() if gated else None
        h = FakeHandle()
        t0 = time.perf_counter()
        job = eng.submit(h, dev, host, [[0, 0], [3, 3]], compute_event=event)
        assert job.wait(30) and h.completed, h.error_text
        took = time.perf_counter() - t0
        if gated:
            assert took >= LAYER_S * 0.75, f"the store finished {took * 1e3:.0f} ms after submit, before its layer"
        else:
            assert took < LAYER_S * 0.5, f"an ungated store waited {took * 1e3:.0f} ms (control)"
        compute.synchronize()
    finally:
        assert eng.close(timeout=60)


def test_compute_stream_waits_for_a_load(compute):
    """A layer launched after wait_for(load) starts only once the load's copies are done: the
    load is queued behind a long layer on a second compute stream's event."""
    from kvsched.bench.gpu_compute import GpuCompute

    eng = TransferEngine(None, backend="cuda")
    try:
        # Every allocation before the clock: allocating pinned or device memory may synchronise
        # the device, which would let the blocking layer end before the load is queued.
        n = 64
        host = pinned_empty((1, n, 65536))
        host[:] = np.random.default_rng(0).integers(0, 256, host.shape, dtype=np.uint8)
        hp, dev = BlockPool.from_array(host), BlockPool.from_array(DeviceBuffer((1, n, 65536)))
        pairs = [[i, i] for i in range(n)]
        with GpuCompute() as blocker:
            gc.collect()
            compute.start_pass()  # time zero, just before the blocking layer
            blocker.start_pass()
            blocker.layer(LAYER_S)
            held = blocker.record()
            h = FakeHandle()
            load = eng.submit(h, hp, dev, pairs, wait_event=held)
            compute.wait_for(load)
            compute.layer(0.001)
            (start, _), = compute.layer_spans()
            blocker.synchronize()
            assert load.wait(30) and h.completed, h.error_text
            assert start >= LAYER_S * 0.9, f"the layer started {start * 1e3:.0f} ms in, before its load"
    finally:
        assert eng.close(timeout=60)


def test_cuda_engine_simulation_runs(gpu):
    from kvsched.bench.engine_sim import EngineConfig, run_engine

    cfg = EngineConfig(layers=4, iterations=4, requests=2, compute_per_layer_s=0.002,
                       backend="cuda", compute="gpu", rounds=1)
    result = run_engine(cfg)
    assert result["failed_ops"] == 0 and result["errors"] == []
    assert result["ops"] == 2 * 4 * 4 * 2
    assert 0.0 <= result["hidden_fraction"] <= 1.0
    assert len(result["timeline"].compute) == 4 * 4
    assert all(b - a >= 0.0019 for a, b in result["timeline"].compute)
