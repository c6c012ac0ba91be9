"""KvschedConnector inside vLLM's real scheduler, workers on CPU tensors in vLLM's layouts.

Each test drives ``vllm.v1.core.sched.scheduler.Scheduler`` through :class:`kvsched.vllm.harness.Engine`
(see its docstring): every worker checks before each forward that the KV of every earlier
position holds what the deterministic model wrote, so a wrong or missing load fails the test,
and outputs are compared with the model's expected tokens.
"""

from __future__ import annotations

import os
import threading

import pytest

if os.environ.get("KVSCHED_REQUIRE_VLLM"):  # CI's vLLM environment: a missing vLLM is a failure
    import torch  # noqa: F401
    import vllm  # noqa: F401
pytest.importorskip("torch", reason='the vLLM connector tests need torch and vLLM: pip install "kvsched[vllm]"')
pytest.importorskip("vllm", reason='vLLM is not installed: pip install "kvsched[vllm]" (CI builds a CPU vLLM env)')

from kvsched.vllm import harness as H  # noqa: E402
from kvsched.errors import InvalidArgumentError  # noqa: E402

# load_mode, and "/layer" for one operation per layer and step (the cuda backend's default; the
# host backend's is one per step)
MODES = ["async", "layerwise", "async/layer", "layerwise/layer"]
BLOCK_BYTES = H.spec().page_size_bytes * H.LAYERS  # one block, all layers, one worker


def extra(mode="async", blocks=64, **kw):
    mode, _, granularity = mode.partition("/")
    return {"host_bytes": blocks * BLOCK_BYTES, "load_mode": mode, "backend": "host",
            "op_granularity": granularity or "auto", **kw}


def wipe_gpu(e: H.Engine) -> None:
    """Zero every worker's KV: a later hit can only come from the host tier."""
    for w in e.workers:
        for t in w.kv.values():
            t.zero_()


def finish(e: H.Engine, rid: str, prompt, n: int) -> None:
    e.run()
    assert e.outputs[rid] == H.expected_output(prompt, n)


@pytest.fixture
def engines():
    made = []

    def make(*args, **kwargs):
        e = H.Engine(*args, **kwargs)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BLNHC", "FA"])
def test_prefix_stored_after_prefill_then_served_from_the_tier(engines, mode, layout):
    e = engines(extra(mode), layout=layout)
    p = H.prompt(1, 70)  # 4 full blocks + 6 tokens
    e.add("a", p, 3)
    e.step()  # prefill: blocks 0..3 became full, their stores are gated on this step's layers
    e.drain_wait()
    e.step()  # the stores' outcomes reach the scheduler side
    lead = e.connector.leader
    assert lead.tier.count_hits(e.requests["a"].block_hashes) == 4
    a_blocks = list(e.scheduler.kv_cache_manager.get_block_ids("a")[0][:4])
    snapshot = {n: t.clone() for n, t in e.workers[0].kv.items()}
    finish(e, "a", p, 3)
    wipe_gpu(e)
    e.add("filler", H.prompt(99, 72), 12)  # takes the 5 blocks a freed: b lands elsewhere
    e.step()
    q = p[:64] + H.prompt(2, 9)  # same 4-block prefix, different tail
    e.add("b", q, 4)
    hits_before = e.hit_tokens
    e.step()
    b_blocks = list(e.scheduler.kv_cache_manager.get_block_ids("b")[0][:4])
    finish(e, "b", q, 4)  # every worker checked the loaded prefix before computing on it
    assert e.hit_tokens - hits_before == 64
    assert set(a_blocks).isdisjoint(b_blocks), (a_blocks, b_blocks)
    assert lead.stats["loads_ok"] == 1 and lead.stats["loads_failed"] == 0
    # b's blocks held exactly what a computed (b's GPU blocks are freed but not rewritten)
    for name, t in e.workers[0].kv.items():
        for a_id, b_id in zip(a_blocks, b_blocks):
            assert bool((H.read_kv(t, layout, b_id, slice(None)) ==
                         H.read_kv(snapshot[name], layout, a_id, slice(None))).all())
    e.run()
    e.assert_empty()


@pytest.mark.parametrize("mode", MODES)
def test_eviction_under_a_small_tier(engines, mode):
    e = engines(extra(mode, blocks=5))
    prompts = [H.prompt(10 + i, 66) for i in range(3)]  # 4 full blocks each, tier holds 5
    for i, p in enumerate(prompts):
        e.add(f"r{i}", p, 2)
        finish(e, f"r{i}", p, 2)
    lead = e.connector.leader
    assert lead.tier.evictions == 3 * 4 - 5
    assert lead.tier.count_hits(e.requests["r2"].block_hashes) == 4
    assert lead.tier.count_hits(e.requests["r0"].block_hashes) == 0
    wipe_gpu(e)
    e.add("again0", prompts[0], 2)
    e.add("again2", prompts[2], 2)
    before = e.hit_tokens
    finish(e, "again0", prompts[0], 2)
    assert e.outputs["again2"] == H.expected_output(prompts[2], 2)
    assert e.hit_tokens - before == 64  # only the blocks still in the tier
    e.assert_empty()


@pytest.mark.parametrize("mode", MODES)
def test_two_requests_sharing_a_prefix_concurrently(engines, mode):
    e = engines(extra(mode))
    base = H.prompt(3, 48)
    p1, p2 = base + H.prompt(4, 20), base + H.prompt(5, 30)
    e.add("x", p1, 5)
    e.add("y", p2, 5)
    e.run()
    assert e.outputs["x"] == H.expected_output(p1, 5) and e.outputs["y"] == H.expected_output(p2, 5)
    lead = e.connector.leader
    assert lead.tier.count_hits(e.requests["x"].block_hashes) == 4
    assert lead.tier.count_hits(e.requests["y"].block_hashes) == 5  # decode filled a 5th
    assert lead.stats["blocks_store_planned"] == 3 + 1 + 2  # the shared 3 stored once
    wipe_gpu(e)
    p3 = base + H.prompt(6, 5)
    e.add("z", p3, 2)
    finish(e, "z", p3, 2)
    e.assert_empty()


class Gate:
    """A fault hook that holds copies of one kind until released (a slow transfer)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "load" (into the GPU pool) or "store"
        self.open = threading.Event()
        self.entered = threading.Event()
        self.fail = False

    def __call__(self, job) -> None:
        gpu_dst = job.plan.dst.device == "cpu" and job.plan.dst.dtype == "float16"  # host pools are uint8
        if (self.kind == "load") == gpu_dst:
            self.entered.set()
            assert self.open.wait(20), "gate never opened"
            if self.fail:
                raise OSError("injected transfer failure")


def test_abort_during_a_load(engines):
    gate = Gate("load")
    e = engines(extra("async"), fault_hook=gate)
    p = H.prompt(7, 70)
    e.add("a", p, 2)
    finish(e, "a", p, 2)
    gate.open.clear()
    e.add("b", p[:64] + [9, 9, 9], 3)
    e.step()  # b waits for its load; the copy is held in the gate
    assert gate.entered.wait(10)
    assert e.scheduler.requests["b"].status.name == "WAITING_FOR_REMOTE_KVS"
    e.abort("b")
    for _ in range(3):
        e.step()
        assert "b" in e.scheduler.requests  # its blocks stay until the copy has landed
    gate.open.set()
    e.run()
    assert "b" not in e.scheduler.requests
    e.assert_empty()


@pytest.mark.parametrize("mode", ["async", "async/layer"])
def test_abort_during_a_store(engines, mode):
    gate = Gate("store")
    gate.open.set()
    e = engines(extra(mode), fault_hook=gate)
    p = H.prompt(8, 100)
    e.add("a", p, 20)
    gate.open.clear()
    gate.entered.clear()
    e.step()  # prefill: 6 stores gated on this step's layers; the (first) copy holds in the gate
    assert gate.entered.wait(10)
    e.abort("a")
    for _ in range(3):
        e.step()
        assert "a" in e.scheduler.requests  # blocks kept while a store reads them
    gate.open.set()
    e.run()
    e.assert_empty()
    lead = e.connector.leader
    # a store that ran completed; none became a hit before that; cancelled ones never do
    assert lead.stats["stores_ok"] + lead.stats["stores_failed"] == lead.stats["stores_planned"]


@pytest.mark.parametrize("mode", MODES)
def test_injected_load_failure_is_recomputed(engines, mode):
    gate = Gate("load")
    gate.open.set()
    e = engines(extra(mode), fault_hook=gate)
    p = H.prompt(9, 70)
    e.add("a", p, 2)
    finish(e, "a", p, 2)
    wipe_gpu(e)
    gate.fail = True
    q = p[:64] + H.prompt(11, 7)
    e.add("b", q, 4)
    finish(e, "b", q, 4)  # right tokens: the failed blocks were recomputed, never read
    lead = e.connector.leader
    assert lead.stats["loads_failed"] == 1
    # the failed entries were dropped: the recomputation stored them again, not served them
    assert lead.stats["loads_planned"] == 1
    e.assert_empty()


@pytest.mark.parametrize("mode", MODES)
def test_preemption(engines, mode):
    e = engines(extra(mode), num_blocks=16)
    prompts = [H.prompt(20 + i, 60) for i in range(3)]
    for i, p in enumerate(prompts):
        e.add(f"p{i}", p, 40)
    e.run(400)
    assert e.preempted, "the scenario should preempt"
    for i, p in enumerate(prompts):
        assert e.outputs[f"p{i}"] == H.expected_output(p, 40)
    total = H.KvschedConnector.build_kv_connector_stats()
    for s in e.stats:
        total.aggregate(H.KvschedConnector.build_kv_connector_stats(s))
    assert total.data["preemptions"] >= 1  # fenced in handle_preemptions with stores in flight
    assert total.data["loads_ok"] >= 1  # the preempted request resumed from the tier
    e.assert_empty()


@pytest.mark.parametrize("mode", MODES)
def test_tensor_parallel_two_workers(engines, mode):
    e = engines(extra(mode, blocks=128), tp=2)
    p = H.prompt(30, 70)
    e.add("a", p, 2)
    finish(e, "a", p, 2)
    w0, w1 = (w.connector.worker for w in e.workers)
    assert w0.host_blocks == w1.host_blocks == 64
    wipe_gpu(e)
    e.add("b", p[:64] + [1, 2], 3)
    finish(e, "b", p[:64] + [1, 2], 3)
    assert e.connector.leader.stats["loads_ok"] == 1
    h0, h1 = (w.host_pool.owners[0] for w in (w0, w1))
    assert bool((h0 == h1).all())  # same KV on both (this model writes the same per worker)
    e.assert_empty()


def test_stats_reach_vllm(engines):
    e = engines(extra("async"))
    p = H.prompt(40, 70)
    e.add("a", p, 2)
    finish(e, "a", p, 2)
    wipe_gpu(e)
    e.add("b", p[:64] + [3], 2)
    finish(e, "b", p[:64] + [3], 2)
    total = H.KvschedConnector.build_kv_connector_stats()
    for s in e.stats:
        total.aggregate(H.KvschedConnector.build_kv_connector_stats(s))  # vLLM ships the dict
    r = total.reduce()
    assert r["hit_tokens"] == 64 and r["blocks_loaded"] == 4 and r["blocks_stored"] == 4
    assert r["bytes_loaded"] == 4 * BLOCK_BYTES and r["loads_failed"] == 0 and r["store_s"] > 0


@pytest.mark.parametrize("bad, key", [
    ({}, "host_bytes"),
    ({"host_bytes": 100}, "host_bytes"),
    ({"host_bytes": 1 << 20, "load_mode": "sync"}, "load_mode"),
    ({"host_bytes": 1 << 20, "backend": "tpu"}, "backend"),
    ({"host_bytes": 1 << 20, "max_inflight": 0}, "max_inflight"),
    ({"host_bytes": 1 << 20, "op_timeout": "soon"}, "op_timeout"),
    ({"host_bytes": 1 << 20, "op_granularity": "request"}, "op_granularity"),
    ({"host_bytes": 1 << 20, "hostbytes": 1}, "hostbytes"),
])
def test_bad_configuration_fails_at_start_up(bad, key):
    with pytest.raises(InvalidArgumentError, match=key):
        H.Engine(bad)
