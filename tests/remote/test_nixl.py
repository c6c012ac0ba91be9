"""The nixl backend between two processes: byte-exact writes and reads of scattered blocks, layer
subsets, many concurrent jobs, the other side's operation joined by notification, bad ids refused
before any transfer, and a peer killed mid-transfer (both sides fail, no hang, the survivor goes
on). Each test drives a peer process (``nixl_peer.py``) over a pipe."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

import kvsched
from kvsched import TransferKind
from kvsched.errors import InvalidArgumentError
from nixl_peer import pool_array

pytestmark = pytest.mark.timeout(120)

LAYERS, BLOCKS, BLOCK = 4, 96, 4096


class Local:
    """This process's side: a scheduler, a nixl engine, and a way to get EXECUTE handles."""

    def __init__(self, name, **options):
        self.sched = kvsched.Scheduler(max_inflight=1 << 16)
        self.eng = kvsched.TransferEngine(self.sched, backend="nixl", agent_name=name, **options)
        self.sched.worker.create_slot("local")
        self._lock = threading.Lock()

    def handle(self, u=None, kind=TransferKind.STORE):
        u = u or str(uuid.uuid4())
        with self._lock:  # enqueue + schedule as one step per op when several threads submit
            self.sched.worker.enqueue("local", u, kind)
            h = self.sched.transfer.schedule("local", u)
        assert h.wait(5) is not None
        return h

    def close(self):
        assert self.eng.close(timeout=30)
        self.sched.close()


@pytest.fixture
def local():
    made = []

    def make(name=None, **options):
        lo = Local(name or f"test-{uuid.uuid4().hex[:8]}", **options)
        made.append(lo)
        return lo

    yield make
    for lo in made:
        lo.close()


def _scattered(rng, n, blocks=BLOCKS):
    src = rng.choice(blocks, n, replace=False)
    dst = rng.choice(blocks, n, replace=False)
    return np.stack([src, dst], axis=1)


def test_write_and_read_scattered_blocks_byte_exact(local, spawn_peer):
    peer = spawn_peer("peer-rw")
    lo = local()
    mine = pool_array(LAYERS, BLOCKS, BLOCK, seed=11)
    pool = kvsched.BlockPool.from_array(mine, block_dim=1)
    remote = lo.eng.import_pool(peer.call("pool", "zeros", LAYERS, BLOCKS, BLOCK, 0))
    remote_src = lo.eng.import_pool(peer.call("pool", "rand", LAYERS, BLOCKS, BLOCK, 22))
    theirs = pool_array(LAYERS, BLOCKS, BLOCK, seed=22)
    assert remote.num_blocks == BLOCKS and remote.peer == "peer-rw"
    rng = np.random.default_rng(5)
    # Sizes on both sides of the backend's descriptor paths: up to 64 copies are built as
    # Python tuples, more (trial 3: 40 blocks x every layer = 160 copies) as a numpy array.
    for trial, n in enumerate([1, 5, 17, 40, 33, 8]):
        pairs = _scattered(rng, n)
        layers = sorted(rng.choice(LAYERS, int(rng.integers(1, LAYERS + 1)), replace=False).tolist())
        if trial == 3:
            layers = list(range(LAYERS))
        # write: local -> peer
        job = lo.eng.submit(lo.handle(), pool, remote, pairs, layers)
        assert job.wait(30) and job.ok, job
        for layer in range(LAYERS):
            got = peer.call("blocks", "zeros", layer, pairs[:, 1].tolist())
            want = mine[layer, pairs[:, 0]].tobytes() if layer in layers else None
            if want is not None:
                assert got == want, (trial, layer)
        # read: peer -> local, into a fresh local pool
        into = np.zeros_like(mine)
        dst = kvsched.BlockPool.from_array(into, block_dim=1)
        job = lo.eng.submit(lo.handle(kind=TransferKind.LOAD), remote_src, dst, pairs, layers)
        assert job.wait(30) and job.ok, job
        for layer in range(LAYERS):
            if layer in layers:
                assert np.array_equal(into[layer, pairs[:, 1]], theirs[layer, pairs[:, 0]])
            else:
                assert not into[layer].any(), "a layer outside the subset was written"
    assert lo.sched.worker.is_complete("local")


def test_layers_of_kv_pieces_layout(local, spawn_peer):
    """vLLM's (2, num_blocks, ...) per-layer tensors (K and V pieces): the peer's pool is a plain
    array, so the local side's pieces land in the peer's blocks' halves."""
    peer = spawn_peer("peer-kv")
    lo = local()
    half = BLOCK // 2
    layers = [np.random.default_rng(i).integers(0, 256, (2, BLOCKS, half), dtype=np.uint8) for i in range(LAYERS)]
    pool = kvsched.BlockPool.from_layers(layers, block_dim=1)
    remote = lo.eng.import_pool(peer.call("pool", "kv", LAYERS, BLOCKS, BLOCK, 0))
    # a plain (layers, blocks, BLOCK) array is one piece; the K/V pool has two pieces of half
    # the size: geometries differ and the engine says so before anything moves
    with pytest.raises(InvalidArgumentError):
        lo.eng.submit(lo.handle(), pool, remote, [(0, 0)])
    dense = kvsched.BlockPool.from_array(np.stack([np.concatenate([t[0], t[1]], axis=1) for t in layers]), block_dim=1)
    job = lo.eng.submit(lo.handle(), dense, remote, [(3, 4), (4, 5), (90, 1)])
    assert job.wait(30) and job.ok
    assert peer.call("blocks", "kv", 2, [4, 5, 1]) == np.asarray(dense.owners[0])[2, [3, 4, 90]].tobytes()


def test_notification_completes_the_other_sides_operation(local, spawn_peer):
    peer = spawn_peer("peer-notify")
    lo = local()
    pool = kvsched.BlockPool.from_array(pool_array(LAYERS, BLOCKS, BLOCK, seed=3), block_dim=1)
    remote = lo.eng.import_pool(peer.call("pool", "dst", LAYERS, BLOCKS, BLOCK, 0))
    u = str(uuid.uuid4())
    peer.call("expect", u, None, 30.0)
    assert peer.call("result", u, 0.2) == (False, None), "completed before any transfer"
    job = lo.eng.submit(lo.handle(u), pool, remote, [(1, 2), (7, 8)])
    assert job.wait(30) and job.ok
    done, error = peer.call("result", u, 30.0)
    assert done and error is None
    # the peer's bytes were there when its operation completed (NIXL sends the notification after the data)
    assert peer.call("blocks", "dst", 0, [2, 8]) == np.asarray(pool.owners[0])[0, [1, 7]].tobytes()

    # a notification that comes before the peer expects it waits for it
    u2 = str(uuid.uuid4())
    job = lo.eng.submit(lo.handle(u2), pool, remote, [(5, 5)])
    assert job.wait(30) and job.ok
    time.sleep(0.2)
    peer.call("expect", u2, "test-early-unused", 30.0)  # from another agent: not this one's
    assert peer.call("result", u2, 0.3) == (False, None)
    stats = peer.call("stats")["nixl"]
    assert stats["early_waiting"] == 1


def test_the_read_side_learns_when_its_blocks_were_read(local, spawn_peer):
    peer = spawn_peer("peer-readside")
    lo = local()
    remote = lo.eng.import_pool(peer.call("pool", "src", LAYERS, BLOCKS, BLOCK, 9))
    into = np.zeros((LAYERS, BLOCKS, BLOCK), dtype=np.uint8)
    dst = kvsched.BlockPool.from_array(into, block_dim=1)
    u = str(uuid.uuid4())
    peer.call("expect", u, lo.eng.agent_name, 30.0)
    job = lo.eng.submit(lo.handle(u, TransferKind.LOAD), remote, dst, [(10, 0), (11, 1)], [1])
    assert job.wait(30) and job.ok
    assert peer.call("result", u, 30.0) == (True, None)
    assert np.array_equal(into[1, [0, 1]], pool_array(LAYERS, BLOCKS, BLOCK, seed=9)[1, [10, 11]])


def test_many_concurrent_jobs_from_several_threads(local, spawn_peer):
    peer = spawn_peer("peer-many")
    lo = local()
    mine = pool_array(LAYERS, BLOCKS, BLOCK, seed=4)
    pool = kvsched.BlockPool.from_array(mine, block_dim=1)
    remote = lo.eng.import_pool(peer.call("pool", "dst", LAYERS, BLOCKS, BLOCK, 0))
    jobs, errors = [], []

    def worker(t):
        try:
            for i in range(40):
                b = (t * 40 + i) % BLOCKS  # each (block, layer) written by one job only
                jobs.append(lo.eng.submit(lo.handle(), pool, remote, [(b, b)], [(t * 40 + i) // BLOCKS % LAYERS]))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(jobs) == 160
    assert lo.eng.wait_idle(60)
    assert all(j.ok for j in jobs)
    for layer in range(2):
        ids = [k % BLOCKS for k in range(160) if k // BLOCKS % LAYERS == layer]
        assert peer.call("blocks", "dst", layer, ids) == mine[layer, ids].tobytes()
    stats = lo.eng.stats()
    assert stats["completed"] == 160 and stats["failed"] == 0
    assert lo.sched.worker.is_complete("local")


def test_bad_remote_block_ids_are_refused_before_any_transfer(local, spawn_peer):
    peer = spawn_peer("peer-bounds")
    lo = local()
    pool = kvsched.BlockPool.from_array(pool_array(LAYERS, BLOCKS, BLOCK, seed=8), block_dim=1)
    remote = lo.eng.import_pool(peer.call("pool", "dst", LAYERS, 16, BLOCK, 0))  # 16 blocks there
    h = lo.handle()
    for pairs, layers in (([(0, 16)], None), ([(0, -1)], None), ([(0, 2**40)], None), ([(0, 1)], [LAYERS])):
        with pytest.raises(InvalidArgumentError):
            lo.eng.submit(h, pool, remote, pairs, layers)
    assert lo.eng.stats()["nixl"]["posted"] == 0
    assert peer.call("blocks", "dst", 0, list(range(16))) == bytes(16 * BLOCK)
    job = lo.eng.submit(h, pool, remote, [(0, 15)])  # the refused handle is still the caller's
    assert job.wait(30) and job.ok


def test_initiator_failure_reaches_the_other_side_by_notification(local, spawn_peer):
    peer = spawn_peer("peer-fail")
    lo = local(fault_hook=lambda job: (_ for _ in ()).throw(RuntimeError("injected")))
    pool = kvsched.BlockPool.from_array(pool_array(LAYERS, BLOCKS, BLOCK, seed=8), block_dim=1)
    remote = lo.eng.import_pool(peer.call("pool", "dst", LAYERS, BLOCKS, BLOCK, 0))
    u = str(uuid.uuid4())
    peer.call("expect", u, None, 60.0)
    job = lo.eng.submit(lo.handle(u), pool, remote, [(1, 1)])
    assert job.wait(10) and not job.ok and "injected" in job.error
    t0 = time.monotonic()
    done, error = peer.call("result", u, 30.0)
    assert done and "injected" in error and time.monotonic() - t0 < 10, "failed by notification, not by timeout"
    assert lo.sched.worker.slot_status("local").failed == 1


def test_peer_killed_mid_transfer_fails_both_sides_and_the_survivor_goes_on(local, spawn_peer):
    """The target dies while writes are in flight: the initiator's jobs fail with NIXL's reason
    (no hang); a new peer then works. The initiator dies: the target's expectations fail after
    their timeout."""
    big_blocks, big = 64, 1 << 20  # 64 MiB per layer
    target = spawn_peer("peer-victim")
    lo = local(transfer_timeout=20.0)
    mine = np.ones((1, big_blocks, big), dtype=np.uint8)
    pool = kvsched.BlockPool.from_array(mine, block_dim=1)
    remote = lo.eng.import_pool(target.call("pool", "dst", 1, big_blocks, big, 0))
    jobs = [lo.eng.submit(lo.handle(), pool, remote, [(b, b) for b in range(big_blocks)]) for _ in range(4)]
    target.kill()
    t0 = time.monotonic()
    for j in jobs:
        assert j.wait(30), "a transfer to a dead peer never ended"
    assert time.monotonic() - t0 < 25
    failed = [j for j in jobs if not j.ok]
    assert failed, "every 64 MiB write finished before the kill: nothing was in flight"
    assert all("peer-victim" in j.error for j in failed)
    # the next submit to the dead peer fails the handle (not the caller), with the reason
    j = lo.eng.submit(lo.handle(), pool, remote, [(0, 0)])
    assert j.wait(30) and not j.ok and "peer-victim" in j.error
    status = lo.sched.worker.slot_status("local")
    assert status.failed == len(failed) + 1 and status.completed == len(jobs) - len(failed)

    # the survivor goes on with a new peer
    other = spawn_peer("peer-next")
    remote2 = lo.eng.import_pool(other.call("pool", "dst", 1, 8, BLOCK, 0))
    small = kvsched.BlockPool.from_array(pool_array(1, 8, BLOCK, seed=2), block_dim=1)
    j = lo.eng.submit(lo.handle(), small, remote2, [(3, 4)])
    assert j.wait(30) and j.ok
    assert other.call("blocks", "dst", 0, [4]) == pool_array(1, 8, BLOCK, seed=2)[0, [3]].tobytes()

    # the initiator dies: the target's expectation fails after its timeout, and the target works on
    initiator = spawn_peer("peer-initiator")
    target2 = lo  # this process is the target now
    desc = target2.eng.export_pool(small)
    initiator.call("pool", "src", 1, 8, BLOCK, 5)
    initiator.call("import", "dst", desc)
    u = initiator.call("write", "src", "dst", [(1, 1)], None)
    h = target2.handle(u, TransferKind.LOAD)
    job = target2.eng.expect_remote(h, peer="peer-initiator", timeout=20.0)
    assert job.wait(30) and job.ok  # the first write arrived
    u2 = str(uuid.uuid4())
    job2 = target2.eng.expect_remote(target2.handle(u2, TransferKind.LOAD), peer="peer-initiator", timeout=1.0)
    initiator.kill()
    assert job2.wait(20) and not job2.ok and "no notification" in job2.error
    j = lo.eng.submit(lo.handle(), small, remote2, [(5, 6)])
    assert j.wait(30) and j.ok


def test_listener_connect_and_pools_by_notification(local):
    import socket

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free_port()
    server = local("listener-a", listen_port=port)
    client = local("listener-b")
    with pytest.raises(InvalidArgumentError, match="listener on this engine"):
        client.eng.connect("listener-a", "127.0.0.1", port)
    client = local("listener-c", listen_port=free_port())
    client.eng.connect("listener-a", "127.0.0.1", port, timeout=20)
    theirs = np.zeros((2, 8, BLOCK), dtype=np.uint8)
    server.eng.send_pool("listener-c", kvsched.BlockPool.from_array(theirs, block_dim=1))
    remote = client.eng.receive_pool("listener-a", timeout=20)
    assert remote.peer == "listener-a" and remote.num_blocks == 8
    src = pool_array(2, 8, BLOCK, seed=6)
    job = client.eng.submit(client.handle(), kvsched.BlockPool.from_array(src, block_dim=1), remote, [(2, 3)], [1])
    assert job.wait(30) and job.ok
    assert np.array_equal(theirs[1, 3], src[1, 2])


def test_failed_transfer_reason_names_the_peer(local):
    """A remote pool whose memory the peer no longer has registered (a stale description): the
    job fails with NIXL's reason; nothing is copied and the caller's thread does not raise."""
    a, b = local("stale-a"), local("stale-b")
    arr = np.zeros((1, 8, BLOCK), dtype=np.uint8)
    desc = bytearray(b.eng.export_pool(kvsched.BlockPool.from_array(arr, block_dim=1)))
    remote = a.eng.import_pool(bytes(desc))
    fake = kvsched.RemotePool("stale-b", [remote.layer_ptrs[0] + (1 << 30)], 8, BLOCK, BLOCK, (0,), importer=remote._importer)
    src = kvsched.BlockPool.from_array(np.ones((1, 8, BLOCK), dtype=np.uint8), block_dim=1)
    job = a.eng.submit(a.handle(), src, fake, [(0, 0)])
    assert job.wait(30) and not job.ok and "stale-b" in job.error
    assert not arr.any()
