"""OffloadWorker on torch CUDA tensors with the cuda backend (no vLLM needed): stores gated on
their layer's event, layerwise loads waited on by the compute stream, byte-exact.

Skipped with the reason where torch or a usable CUDA device is missing (this machine's CI); run
on a GPU machine with ``python -m pytest -q tests/offload/test_gpu_worker.py``.
"""

from __future__ import annotations

import pytest

from kvsched import BlockPool
from kvsched.offload import OffloadConfig, OffloadLeader, OffloadWorker

torch = pytest.importorskip("torch", reason="needs torch with CUDA")

pytestmark = pytest.mark.gpu

L, NB, BS, H, D = 4, 64, 16, 8, 64  # layers, GPU blocks, tokens per block, heads, head size
SLEEP_CYCLES = 50_000_000  # ~25-50 ms of compute-stream work before a layer "writes" its KV


@pytest.fixture
def cuda():
    from kvsched.transfer.cudart import cuda_available

    usable, reason = cuda_available()
    if not usable or not torch.cuda.is_available():
        pytest.skip(f"no usable CUDA device: {reason}")
    return torch.device("cuda", 0)


def make(cuda, mode, granularity="auto"):
    kv = [torch.zeros(2, NB, BS, H, D, dtype=torch.float16, device=cuda) for _ in range(L)]
    pool = BlockPool.from_layers(kv, block_dim=1)
    cfg = OffloadConfig.from_dict({"host_bytes": 32 * pool.block_bytes * L, "load_mode": mode, "backend": "cuda",
                                   "op_granularity": granularity})
    w = OffloadWorker(cfg)
    w.register(pool)
    assert w.engine.backend == "cuda" and w.host_pool.is_cuda is False
    return kv, w, OffloadLeader(cfg.num_host_blocks(pool.block_bytes * L), BS, layerwise=mode == "layerwise")


def finish(w, lead, steps=20):
    for _ in range(steps):
        torch.cuda.synchronize()
        w.engine.wait_idle(10)
        w.begin_step(lead.take_plan())
        w.end_step()
        res = w.collect()
        lead.on_reports(res.reports)
        if not lead.pending_ops():
            return
    raise AssertionError("operations still pending")


@pytest.mark.parametrize("granularity", ["auto", "step"])  # auto on cuda: one operation per layer
@pytest.mark.parametrize("mode", ["layerwise", "async"])
def test_gated_stores_then_loads_byte_exact(cuda, mode, granularity):
    kv, w, lead = make(cuda, mode, granularity)
    hashes = [f"a{i}".encode() for i in range(4)]
    src_blocks = [3, 4, 5, 9]
    lead.plan_stores("r1", hashes, src_blocks, 0, 4)
    w.begin_step(lead.take_plan())
    expect = []
    for k in range(L):
        # the compute stream is busy for a while, then writes layer k's blocks; the store copy
        # must wait for the event recorded after the write, not read the zeros before it
        torch.cuda._sleep(SLEEP_CYCLES)
        vals = torch.randn(2, len(src_blocks), BS, H, D, device=cuda).half()
        kv[k][:, src_blocks] = vals
        expect.append(vals)
        ev = torch.cuda.Event()
        ev.record()
        w.layer_done(k, ev)  # never waits on the CPU
    w.end_step()
    lead.on_reports(w.collect().reports)
    finish(w, lead)
    assert lead.tier.count_hits(hashes) == 4
    # byte-exact in the host tier
    host = w.host_pool.owners[0]  # (L, 2, host_blocks, piece_bytes) uint8
    slots = [lead.tier.slot_of(h) for h in hashes]
    for k in range(L):
        got = torch.as_tensor(host[k][:, slots]).view(torch.float16).reshape(2, len(slots), BS, H, D)
        assert torch.equal(got, expect[k].cpu()), f"layer {k}"
    # load into other blocks; the compute stream reads them right after waiting
    dst = [40, 41, 50, 63]
    n = lead.lookup("r2", hashes, 0, 4 * BS + 1)
    lead.plan_load("r2", hashes, dst, n)
    w.begin_step(lead.take_plan())
    ev = torch.cuda.Event()
    ev.record()
    reads = []
    if mode == "layerwise":
        w.start_loads(wait_event=ev)
        for k in range(L):
            w.wait_layer_load(k, torch.cuda.current_stream())
            reads.append(kv[k][:, dst].clone())  # ordered after the copy on the GPU
            w.layer_done(k, None)
        w.end_step()
        res = w.collect()
    else:
        w.end_step()
        w.start_loads(wait_event=ev)
        w.engine.wait_idle(10)
        res = w.collect()
        torch.cuda.synchronize()
        reads = [kv[k][:, dst].clone() for k in range(L)]
        assert "r2" in res.finished_recving
    assert not res.failed_blocks
    torch.cuda.synchronize()
    for k in range(L):
        assert torch.equal(reads[k].cpu(), expect[k].cpu()), f"layer {k}"
    w.close()
