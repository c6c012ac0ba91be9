"""OffloadLeader: lookups, load and store plans, reports from several workers."""

from kvsched.offload import OffloadLeader, OpReports

BS = 4


def hashes(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


def report(leader: OffloadLeader, plan, ok=True, workers=1):
    r = OpReports()
    for spec in plan.loads + plan.stores:
        for _ in range(workers):
            r.add(spec.op_id, ok)
    return leader.on_reports(r)


def test_store_then_hit_then_load():
    lead = OffloadLeader(16, BS)
    h = hashes("a", 3)
    assert lead.lookup("r1", h, 0, 12) == 0
    spec = lead.plan_stores("r1", h, [5, 6, 7], 0, 3)
    assert spec.gpu_blocks == [5, 6, 7] and len(set(spec.host_blocks)) == 3
    plan = lead.take_plan()
    assert plan.stores == [spec] and not plan.loads
    # not a hit before the store is reported: ask again later (None), do not recompute
    assert lead.lookup("r2", h, 0, 13) is None and lead.stats["lookups_deferred"] == 1
    assert report(lead, plan) == [("r1", 1, True)]
    # 13 tokens: 3 full blocks, at least one token left to compute
    assert lead.lookup("r2", h, 0, 13) == 12
    assert lead.lookup("r2", h, 0, 12) == 8  # 12 tokens: the last block is recomputed
    assert lead.lookup("r2", h, 4, 13) == 8
    load = lead.plan_load("r2", h, [9, 10, 11], 8)
    assert load.gpu_blocks == [10, 11] and not load.layerwise
    assert lead.finished("r2") is False  # waiting for its async load: the engine waits itself
    plan = lead.take_plan()
    assert plan.loads == [load] and not plan.release


def test_stores_skip_blocks_already_in_the_tier():
    lead = OffloadLeader(16, BS)
    h = hashes("a", 4)
    lead.plan_stores("r1", h, [0, 1], 0, 2)
    spec = lead.plan_stores("r2", h, [2, 3, 4, 5], 0, 4)
    assert spec.gpu_blocks == [4, 5]
    # blocks already considered for a request are not planned twice
    assert lead.plan_stores("r2", h, [2, 3, 4, 5], 0, 4) is None


def test_reports_from_every_worker_are_needed():
    lead = OffloadLeader(16, BS, world_size=2)
    h = hashes("a", 1)
    lead.plan_stores("r1", h, [0], 0, 1)
    plan = lead.take_plan()
    assert report(lead, plan) == []
    assert lead.lookup("x", h, 0, 8) is None  # still being stored on one worker
    assert report(lead, plan) == [("r1", 1, True)]
    assert lead.lookup("x", h, 0, 8) == 4


def test_one_failed_worker_fails_the_store():
    lead = OffloadLeader(16, BS, world_size=2)
    h = hashes("a", 1)
    lead.plan_stores("r1", h, [0], 0, 1)
    plan = lead.take_plan()
    r = OpReports()
    r.add(plan.stores[0].op_id, True)
    r.aggregate(OpReports({plan.stores[0].op_id: [1, 1]}))
    assert lead.on_reports(r) == [("r1", 1, False)]
    assert lead.lookup("x", h, 0, 8) == 0 and len(lead.tier) == 0


def test_failed_load_drops_entries_so_they_are_not_offered_again():
    lead = OffloadLeader(16, BS)
    h = hashes("a", 2)
    lead.plan_stores("r1", h, [0, 1], 0, 2)
    report(lead, lead.take_plan())
    assert lead.lookup("r2", h, 0, 9) == 8
    lead.plan_load("r2", h, [4, 5], 8)
    report(lead, lead.take_plan(), ok=False)
    assert lead.lookup("r2", h, 0, 9) == 0


def test_finished_request_with_stores_in_flight_is_released_later():
    lead = OffloadLeader(16, BS)
    h = hashes("a", 2)
    lead.plan_stores("r1", h, [0, 1], 0, 2)
    stores = lead.take_plan()
    assert lead.finished("r1") is True
    plan = lead.take_plan()
    assert plan.release == ["r1"] and not plan.aborted
    report(lead, stores)
    assert not lead.has_request("r1")
    # aborted: the workers also cancel what has not started
    lead.plan_stores("r3", hashes("b", 1), [3], 0, 1)
    lead.take_plan()
    assert lead.finished("r3", aborted=True) is True
    plan = lead.take_plan()
    assert plan.aborted == ["r3"] and plan.release == ["r3"]
    # nothing in flight: blocks are freed at once
    lead.lookup("r4", h, 0, 4)
    assert lead.finished("r4") is False


def test_eviction_under_a_small_tier():
    lead = OffloadLeader(2, BS)
    a, b = hashes("a", 2), hashes("b", 2)
    lead.plan_stores("r1", a, [0, 1], 0, 2)
    report(lead, lead.take_plan())
    lead.plan_stores("r2", b, [2, 3], 0, 2)
    report(lead, lead.take_plan())
    assert lead.lookup("x", a, 0, 9) == 0 and lead.lookup("y", b, 0, 9) == 8
    assert lead.tier.evictions == 2


def test_preemption_is_planned_for_requests_with_operations():
    lead = OffloadLeader(4, BS)
    lead.plan_stores("r1", hashes("a", 1), [0], 0, 1)
    lead.preempted("r1")
    lead.preempted("unknown")
    assert lead.take_plan().preempted == ["r1"]


def test_a_failed_store_ends_the_wait():
    lead = OffloadLeader(16, BS)
    h = hashes("a", 2)
    lead.plan_stores("r1", h, [0, 1], 0, 2)
    plan = lead.take_plan()
    assert lead.lookup("r2", h, 0, 9) is None
    report(lead, plan, ok=False)
    assert lead.lookup("r2", h, 0, 9) == 0


def test_a_block_whose_hash_came_late_is_still_stored():
    lead = OffloadLeader(16, BS)
    h = hashes("a", 3)
    lead.plan_stores("r1", h[:1], [0, 1, 2], 0, 2)  # block 1 full, its hash not known yet
    assert lead.take_plan().stores[0].gpu_blocks == [0]
    spec = lead.plan_stores("r1", h, [0, 1, 2], 2, 3)  # next step: block 1's hash is known
    assert spec.gpu_blocks == [1, 2]


def test_blocks_computed_before_the_first_plan_are_not_stored():
    lead = OffloadLeader(16, BS)
    h = hashes("a", 4)
    spec = lead.plan_stores("r1", h, [0, 1, 2, 3], 2, 4)  # blocks 0-1 were local prefix hits
    assert spec.gpu_blocks == [2, 3]
