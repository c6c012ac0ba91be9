"""The engine-independent half of disaggregated serving: what a producer's scheduler side plans
and hands out, and how a consumer's checks what arrives (untrusted: it came over the network).
No NIXL needed; tests/vllm/test_disagg.py runs the whole path over NIXL."""

import base64

import numpy as np
import pytest

from kvsched.errors import InvalidArgumentError
from kvsched.offload import OffloadConfig, OffloadLeader, OffloadWorker, OpReports
from kvsched.offload.leader import check_remote_params
from kvsched.offload.plan import RecvSpec, SendSpec, StepPlan

BS = 16


def producer(world_size=1):
    lead = OffloadLeader(8, BS, world_size=world_size)
    lead.exports.update({r: f"pool-of-rank-{r}".encode() for r in range(world_size)})
    return lead


def test_a_finished_request_is_kept_until_every_worker_reported_the_read():
    lead = producer(world_size=2)
    params = lead.plan_send("r", [7, 3, 9])
    assert params["block_ids"] == [7, 3, 9] and params["v"] == 1
    assert [base64.b64decode(p) for p in params["pools"]] == [b"pool-of-rank-0", b"pool-of-rank-1"]
    assert lead.finished("r") is True  # keep the blocks
    plan = lead.take_plan()
    assert plan.release == ["r"]
    (send,) = plan.sends
    assert send.gpu_blocks == [7, 3, 9] and f"{send.op_id:032x}" == params["op_id"]
    one = OpReports()
    one.add(send.op_id, True)
    assert lead.on_reports(one) == []  # one worker of two
    assert lead.on_reports(one) == [("r", 2, True)]
    assert lead.pending_ops() == 0 and lead.stats["sends_ok"] == 1


def test_no_pools_described_yet_means_no_send():
    lead = OffloadLeader(8, BS, world_size=2)
    lead.exports[0] = b"only rank 0"
    assert lead.plan_send("r", [1]) is None
    assert lead.finished("r") is False and not lead.take_plan()
    assert lead.stats["sends_unavailable"] == 1


def test_a_consumer_plans_the_read_of_the_tokens_it_lacks():
    params = producer().plan_send("r", [20, 21, 22, 23, 24])
    lead = OffloadLeader(8, BS)
    # 32 tokens computed locally (a prefix-cache hit), 38 to read: blocks 2..4 of the producer
    spec = lead.plan_recv("r", params, [5, 6, 7, 8, 9], 32, 38)
    assert isinstance(spec, RecvSpec)
    assert spec.gpu_blocks == [7, 8, 9] and spec.remote_blocks == [22, 23, 24]
    assert spec.pools == [b"pool-of-rank-0"] and f"{spec.op_id:032x}" == params["op_id"]
    assert lead.finished("r") is False  # the engine waits for an async read itself
    assert lead.take_plan().recvs == [spec]


@pytest.mark.parametrize("tamper, message", [
    (lambda p: p.update(v=2), "version"),
    (lambda p: p.update(op_id="zz" * 16), "op_id"),
    (lambda p: p.update(op_id="0" * 31 + "1"), "op_id"),  # low 16 bits name a layer part
    (lambda p: p.update(op_id=12345), "op_id"),
    (lambda p: p.update(block_ids=[1, "2"]), "block_ids"),
    (lambda p: p.update(block_ids=[1, True]), "block_ids"),
    (lambda p: p.update(block_ids=[1, np.int64(2)]), "block_ids"),  # not what JSON carries
    (lambda p: p.update(block_ids=[1, float("nan")]), "block_ids"),
    (lambda p: p.update(op_id="f" * 32), "op_id"),
    (lambda p: p.update(op_id=float("inf")), "op_id"),
    (lambda p: p.update(block_ids=[2**40]), "block_ids"),
    (lambda p: p.update(block_ids=None), "block_ids"),
    (lambda p: p.update(pools=["a", "b"]), "tensor parallel"),
    (lambda p: p.update(pools="abc"), "pools"),
    (lambda p: p.update(pools=["not base64!"]), "base64"),
    (lambda p: p.clear(), "version"),
])
def test_malformed_params_are_refused_with_the_reason(tamper, message):
    params = producer().plan_send("r", [1, 2])
    tamper(params)
    with pytest.raises(InvalidArgumentError, match=message):
        check_remote_params(params, 1)


@pytest.mark.parametrize("params", [None, [], "x", 3.5, {"v": 1}])
def test_params_of_the_wrong_type_are_refused(params):
    with pytest.raises(InvalidArgumentError):
        check_remote_params(params, 1)


def test_a_read_that_does_not_fit_is_planned_to_fail_so_the_engine_recomputes():
    params = producer().plan_send("r", [20, 21])
    lead = OffloadLeader(8, BS)
    spec = lead.plan_recv("r", params, [5, 6, 7, 8], 0, 60)  # 4 blocks wanted, the producer has 2
    assert spec.pools == [] and spec.gpu_blocks == [5, 6, 7, 8]  # no pool: every worker fails it
    assert lead.stats["recvs_refused"] == 1
    assert f"{spec.op_id:032x}" != params["op_id"]  # never the producer's uuid


def test_the_same_operation_twice_is_refused_even_after_the_first_read_ended():
    # Replayed parameters would read blocks the producer may have given to another request.
    params = producer().plan_send("r", [20, 21])
    lead = OffloadLeader(8, BS)
    first = lead.plan_recv("a", params, [1, 2], 0, 20)
    second = lead.plan_recv("b", params, [3, 4], 0, 20)
    assert first.pools and not second.pools
    done = OpReports()
    done.add(first.op_id, True)
    assert lead.on_reports(done) == [("a", 3, True)]
    third = lead.plan_recv("c", params, [5, 6], 0, 20)
    assert not third.pools and lead.stats["recvs_refused"] == 2


def test_remote_timeout_is_checked():
    assert OffloadConfig.from_dict({"host_bytes": 1 << 20}).remote_timeout == 480.0
    assert OffloadConfig.from_dict({"host_bytes": 1 << 20, "remote_timeout": 5}).remote_timeout == 5.0
    for bad in (0, -1, float("inf"), float("nan"), "5", True, None):
        with pytest.raises(InvalidArgumentError, match="remote_timeout"):
            OffloadConfig.from_dict({"host_bytes": 1 << 20, "remote_timeout": bad})


def test_a_worker_refuses_a_plan_for_the_other_role():
    w = OffloadWorker(OffloadConfig(host_bytes=1 << 20))
    with pytest.raises(InvalidArgumentError, match="peer_role"):
        OffloadWorker(OffloadConfig(host_bytes=1 << 20), peer_role="both")
    import numpy as np

    from kvsched import BlockPool

    w.register(BlockPool.from_array(np.zeros((2, 2, 8, 64), dtype=np.uint8), block_dim=2))
    try:
        with pytest.raises(InvalidArgumentError, match="kv_producer"):
            w.begin_step(StepPlan(sends=[SendSpec(1 << 16, "r", [1])]))
        with pytest.raises(InvalidArgumentError, match="kv_consumer"):
            w.begin_step(StepPlan(recvs=[RecvSpec(1 << 16, "r", [1], [1], [b""])]))
    finally:
        w.close()


def test_a_request_ended_before_its_read_tells_the_producer_once():
    params = producer().plan_send("r", [20, 21])
    lead = OffloadLeader(8, BS)
    spec = lead.cancel_recv("r", params)
    assert spec.cancel and spec.gpu_blocks == [] and spec.pools == [b"pool-of-rank-0"]
    assert f"{spec.op_id:032x}" == params["op_id"]
    assert lead.take_plan().recvs == [spec]
    assert lead.cancel_recv("r", params) is None  # told once
    assert not lead.plan_recv("r", params, [1, 2], 0, 20).pools  # and never read afterwards
    assert lead.cancel_recv("x", {"v": 1}) is None  # malformed: nothing to tell
    assert lead.stats["recvs_cancelled"] == 1 and lead.pending_ops() == 1  # the refused read's
