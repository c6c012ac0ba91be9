"""OffloadWorker with OffloadLeader on numpy "GPU" pools and the host backend (no engine needed)."""

import numpy as np
import pytest

from kvsched import BlockPool
from kvsched.errors import InvalidArgumentError
from kvsched.offload import OffloadConfig, OffloadLeader, OffloadWorker
from kvsched.offload.plan import OpReports

L, NB, BS, PAGE = 3, 16, 4, 64  # layers, GPU blocks, tokens per block, bytes per block and layer


def make(host_blocks=8, load_mode="async", granularity="auto", **engine_options):
    kv = np.zeros((L, NB, PAGE), dtype=np.uint8)
    cfg = OffloadConfig.from_dict({"host_bytes": host_blocks * L * PAGE, "load_mode": load_mode, "backend": "host",
                                   "op_granularity": granularity})
    w = OffloadWorker(cfg, engine_options=engine_options)
    w.register(BlockPool.from_array(kv))
    lead = OffloadLeader(cfg.num_host_blocks(L * PAGE), BS, layerwise=load_mode == "layerwise")
    return kv, w, lead


def step(w, lead, kv=None, writes=(), finished=(), layerwise_wait=False):
    """One engine step: begin, (layerwise) loads, layers written one by one, end, collect."""
    plan = lead.take_plan()
    w.begin_step(plan)
    if any(s.layerwise for s in plan.loads):
        w.start_loads()
    for layer in range(L):
        if layerwise_wait:
            w.wait_layer_load(layer)
        for block, value in writes:
            kv[layer, block] = value + layer
        w.layer_done(layer)
    if not any(s.layerwise for s in plan.loads):
        w.start_loads()
    w.end_step()
    res = w.collect(finished)
    lead.on_reports(res.reports)
    return res


def settle(w, lead, n=50):
    out = []
    for _ in range(n):
        w.engine.wait_idle(5)
        res = step(w, lead)
        out.append(res)
        if not lead.pending_ops():
            break
    return out


def test_store_then_load_byte_equal_into_other_blocks():
    kv, w, lead = make()
    h = [b"a0", b"a1", b"a2"]
    lead.plan_stores("r1", h, [0, 1, 2], 0, 3)
    step(w, lead, kv, writes=[(0, 10), (1, 20), (2, 30)])
    settle(w, lead)
    assert lead.tier.count_hits(h) == 3
    n = lead.lookup("r2", h, 0, 13)
    assert n == 12
    lead.plan_load("r2", h, [7, 8, 9], n)
    res = step(w, lead)
    results = [res] + settle(w, lead)
    assert any("r2" in r.finished_recving for r in results)
    assert not any(r.failed_blocks for r in results)
    assert (kv[:, 7:10] == kv[:, 0:3]).all() and kv[0, 7, 0] == 10 and kv[2, 9, 0] == 32
    assert w.scheduler.worker.take_finished() == []


def test_store_waits_for_its_layer():
    kv, w, lead = make(granularity="layer")
    lead.plan_stores("r1", [b"x"], [3], 0, 1)
    plan = lead.take_plan()
    w.begin_step(plan)
    kv[0, 3] = 1
    w.layer_done(0)
    w.engine.wait_idle(5)
    host = w.host_pool
    assert w.engine.stats()["completed"] == 1  # layer 0 copied, layers 1 and 2 not yet
    kv[1, 3] = 2
    kv[2, 3] = 3
    w.layer_done(2)  # a hook that skipped layer 1: both are marked
    w.end_step()
    w.engine.wait_idle(5)
    res = w.collect()
    assert res.reports.ops[plan.stores[0].op_id] == [1, 0]
    slot = plan.stores[0].host_blocks[0]
    arr = host.owners[0]
    assert [arr[k, 0, slot, 0] for k in range(L)] == [1, 2, 3]


def test_injected_load_failure_reports_blocks_and_drops_entries():
    fail = {"on": False}

    def hook(job):
        if fail["on"] and job.kind == "h2h" and job.plan.dst.num_blocks == NB:
            raise OSError("injected")

    kv, w, lead = make(fault_hook=hook)
    h = [b"a0", b"a1"]
    lead.plan_stores("r1", h, [0, 1], 0, 2)
    step(w, lead, kv, writes=[(0, 1), (1, 2)])
    settle(w, lead)
    fail["on"] = True
    lead.plan_load("r2", h, [5, 6], lead.lookup("r2", h, 0, 9))
    results = [step(w, lead)] + settle(w, lead)
    failed = set().union(*(r.failed_blocks for r in results))
    assert failed == {5, 6}
    assert any("r2" in r.finished_recving for r in results)
    assert lead.lookup("r2", h, 0, 9) == 0  # not offered again


@pytest.mark.parametrize("granularity", ["layer", "step"])
def test_layerwise_loads_wait_per_layer(granularity):
    kv, w, lead = make(load_mode="layerwise", granularity=granularity)
    h = [b"a0"]
    lead.plan_stores("r1", h, [2], 0, 1)
    step(w, lead, kv, writes=[(2, 7)])
    settle(w, lead)
    lead.plan_load("r2", h, [11], lead.lookup("r2", h, 0, 5))
    res = step(w, lead, layerwise_wait=True)
    assert not res.failed_blocks and not res.finished_recving
    assert (kv[:, 11] == kv[:, 2]).all() and kv[1, 11, 0] == 8


def test_abort_cancels_stores_that_have_not_started_and_releases_after_drain():
    kv, w, lead = make()
    lead.plan_stores("r1", [b"a0", b"a1"], [0, 1], 0, 2)
    plan = lead.take_plan()
    w.begin_step(plan)  # gated on layers that never complete in this step
    assert lead.finished("r1", aborted=True) is True
    w.end_step()
    res = w.collect()
    lead.on_reports(res.reports)
    w.begin_step(lead.take_plan())  # carries aborted + release
    w.end_step()
    results = [w.collect(["r1"])] + settle(w, lead)
    assert any("r1" in r.finished_sending for r in results)
    assert len(lead.tier) == 0 or lead.tier.count_hits([b"a0", b"a1"]) in (0, 1, 2)
    assert not lead.has_request("r1")


def test_preemption_fences_running_stores_and_the_request_goes_on():
    kv, w, lead = make()
    kv[:, 0] = 9
    lead.plan_stores("r1", [b"a0"], [0], 0, 1)
    w.begin_step(lead.take_plan())  # the store is gated on this step's layers
    lead.preempted("r1")
    w.begin_step(lead.take_plan())  # next step: the store's layers are past; fenced before return
    assert w.engine.pending == 0
    res = w.collect()
    lead.on_reports(res.reports)
    assert res.reports.ops and all(v == [1, 0] for v in res.reports.ops.values())
    assert lead.tier.count_hits([b"a0"]) == 1
    # the request goes on
    lead.plan_stores("r1", [b"a0", b"a1"], [0, 1], 1, 2)
    step(w, lead, kv, writes=[(1, 5)])
    settle(w, lead)
    assert lead.tier.count_hits([b"a0", b"a1"]) == 2


def test_a_load_not_started_in_its_step_is_joined_at_the_next():
    kv, w, lead = make()
    lead.plan_stores("r0", [b"a0"], [0], 0, 1)
    step(w, lead, kv, writes=[(0, 1)])
    settle(w, lead)
    lead.plan_load("r1", [b"a0"], [5], lead.lookup("r1", [b"a0"], 0, 5))
    w.begin_step(lead.take_plan())  # an engine that skipped start_load_kv in this step
    w.end_step()
    lead.on_reports(w.collect().reports)
    results = settle(w, lead)
    assert lead.pending_ops() == 0 and any("r1" in r.finished_recving for r in results)
    assert (kv[:, 5] == kv[:, 0]).all()


@pytest.mark.parametrize("granularity, jobs", [("layer", L), ("step", 1), ("auto", 1)])
def test_stores_of_one_step_share_one_job_per_layer_or_step(granularity, jobs):
    kv, w, lead = make(granularity=granularity)
    for i, rid in enumerate(("r1", "r2", "r3")):
        lead.plan_stores(rid, [f"{rid}a".encode()], [i], 0, 1)
    step(w, lead, kv, writes=[(0, 1), (1, 2), (2, 3)])
    settle(w, lead)
    assert w.engine.stats()["completed"] == jobs  # three requests: one copy job per layer, or per step
    assert all(lead.tier.count_hits([f"{r}a".encode()]) == 1 for r in ("r1", "r2", "r3"))
    assert (w.host_pool.owners[0][:, 0, :3, 0] == [[1, 2, 3], [2, 3, 4], [3, 4, 5]]).all()


def test_a_whole_step_store_waits_for_the_last_layer():
    kv, w, lead = make(granularity="step")
    lead.plan_stores("r1", [b"x"], [3], 0, 1)
    plan = lead.take_plan()
    w.begin_step(plan)
    for layer in range(L - 1):
        kv[layer, 3] = 1 + layer
        w.layer_done(layer)
        w.engine.wait_idle(5)
        assert w.engine.stats()["submitted"] == 0  # gated on the last layer
    kv[L - 1, 3] = L
    w.layer_done(L - 1)
    assert w.engine.stats()["submitted"] == 1  # submitted by the last layer's hook, not end_step
    w.end_step()
    w.engine.wait_idle(5)
    res = w.collect()
    assert res.reports.ops[plan.stores[0].op_id] == [1, 0]
    slot = plan.stores[0].host_blocks[0]
    assert [w.host_pool.owners[0][k, 0, slot, 0] for k in range(L)] == [1, 2, 3]


def test_a_whole_step_store_waits_for_every_layer_event():
    """Host events stand in for compute-stream events: the one job waits for each layer's."""
    import threading

    kv, w, lead = make(granularity="step")
    lead.plan_stores("r1", [b"x"], [3], 0, 1)
    plan = lead.take_plan()
    w.begin_step(plan)
    events = [threading.Event() for _ in range(L)]
    for layer in range(L):
        kv[layer, 3] = 1 + layer
        w.layer_done(layer, events[layer])
    w.end_step()
    for ev in events[1:]:
        ev.set()
    assert not w.engine.wait_idle(0.2)  # layer 0's event is not set: nothing copied
    events[0].set()
    assert w.engine.wait_idle(5)
    res = w.collect()
    assert res.reports.ops[plan.stores[0].op_id] == [1, 0]


def test_host_bytes_too_small_and_plan_capacity_mismatch():
    kv = np.zeros((L, NB, PAGE), dtype=np.uint8)
    w = OffloadWorker(OffloadConfig.from_dict({"host_bytes": L * PAGE - 1, "backend": "host"}))
    with pytest.raises(InvalidArgumentError, match="host_bytes"):
        w.register(BlockPool.from_array(kv))
    kv, w, lead = make()
    other = OffloadLeader(3, BS)
    with pytest.raises(InvalidArgumentError, match="host blocks"):
        w.begin_step(other.take_plan())


def test_config_errors_name_the_key():
    with pytest.raises(InvalidArgumentError, match="'bogus'"):
        OffloadConfig.from_dict({"host_bytes": 1, "bogus": 2})
    with pytest.raises(InvalidArgumentError, match="host_bytes"):
        OffloadConfig.from_dict({})
    for key, bad in [("load_mode", "sync"), ("max_inflight", 0), ("backend", "nixl"), ("op_timeout", -1),
                     ("host_bytes", "4GB"), ("op_granularity", "request")]:
        with pytest.raises(InvalidArgumentError, match=key):
            OffloadConfig.from_dict({"host_bytes": 1 << 20, key: bad})


def test_idle_collect_shares_one_read_only_empty_result():
    kv, w, lead = make()
    first, second = step(w, lead), step(w, lead)
    assert first is second  # nothing ended in either step: no allocation per idle step
    assert not first.finished_sending and not first.finished_recving and not first.failed_blocks
    assert not first.reports
    with pytest.raises(AttributeError):
        first.finished_sending.add("r")  # read-only: frozen sets
    with pytest.raises(AttributeError):
        first.reports.add(1, True)  # and a read-only report map
    with pytest.raises(AttributeError):
        first.reports.aggregate(OpReports({1: [1, 0]}))
    assert not OpReports().aggregate(first.reports)  # reading it is fine
    assert not first.reports and step(w, lead) is first
    # A step in which something ends gets a result of its own.
    lead.plan_stores("r1", [b"x0"], [0], 0, 1)
    step(w, lead, kv, writes=[(0, 5)])
    results = settle(w, lead)
    assert any(r.reports for r in results)
    assert all(r is first for r in results if not r.reports and not r.finished_sending)


def test_stats_changed_flags_a_counter_move_until_taken():
    kv, w, lead = make()
    assert w.stats_changed is False
    step(w, lead)
    assert w.stats_changed is False  # idle steps move no counter
    lead.plan_stores("r1", [b"y0", b"y1"], [0, 1], 0, 2)
    step(w, lead, kv, writes=[(0, 1), (1, 2)])
    assert w.stats_changed is True
    settle(w, lead)
    stats = w.take_stats()
    assert stats["stores"] == 1 and stats["stores_ok"] == 1 and stats["blocks_stored"] == 2
    assert w.stats_changed is False
    assert not any(w.take_stats().values())
