"""The small-request fast path of ``build_plan`` (Python lists, lazy coalescing, cached pool-pair
checks) must give the same plan, and the same error, as the general numpy path."""

from __future__ import annotations

import numpy as np
import pytest

from kvsched.pool import BlockPool
from kvsched.transfer import plan as plan_mod
from kvsched.transfer.host import _split
from kvsched.transfer.plan import build_plan


def _general(src, dst, pairs, layers):
    plan_mod._pair_facts(src, dst)  # the pool checks build_plan runs first
    return plan_mod._general_plan(src, dst, pairs, layers)


def _outcome(fn, *args):
    try:
        p = fn(*args)
    except Exception as exc:  # noqa: BLE001 - compared below
        return ("error", type(exc), str(exc))
    lists = [list(x) for x in fn(*args).segment_lists()]  # a fresh plan: nothing made yet
    segs = p.segments()
    assert lists == [s.tolist() for s in segs], "segment_lists() differs from segments()"
    assert [list(x) for x in p.segment_lists()] == lists
    return (
        "ok",
        p.layers.tolist(),
        p.src_ids.tolist(),
        p.dst_ids.tolist(),
        p.runs.tolist(),
        p.runs.shape,
        p.num_blocks,
        p.nbytes,
        p.merged,
        p.num_copies,
        p.kind,
        [s.tolist() for s in segs],
        [s.dtype for s in segs],
    )


@pytest.fixture(scope="module")
def pools():
    a = np.zeros((3, 40, 16), np.float32)
    b = np.zeros((3, 40, 16), np.float32)
    c = np.zeros((2, 30, 16), np.float32)
    kv = np.zeros((3, 2, 40, 16), np.float32)
    strided = BlockPool.from_pointers([b.ctypes.data], 20, 64, 128, owner=b)
    return {
        "a": BlockPool.from_array(a),
        "b": BlockPool.from_array(b),
        "c": BlockPool.from_array(c),
        "kv": BlockPool.from_array(kv, block_dim=2),
        "kv2": BlockPool.from_array(kv.copy(), block_dim=2),
        "strided": strided,
        "keep": (a, b, c, kv),
    }


def test_fast_path_matches_general_path(pools):
    rng = np.random.default_rng(7)
    combos = [("a", "b"), ("a", "a"), ("a", "c"), ("c", "a"), ("kv", "kv2"), ("kv", "kv"), ("strided", "a"), ("a", "strided")]
    checked = 0
    for s_name, d_name in combos:
        src, dst = pools[s_name], pools[d_name]
        for n in (1, 2, 3, 5, 17, 64):
            for form in ("np", "list", "tuple", "run"):
                s = rng.integers(0, src.num_blocks, n)
                d = rng.permutation(dst.num_blocks)[:n] if n <= dst.num_blocks else rng.integers(0, dst.num_blocks, n)
                if form == "run":
                    s = np.arange(3, 3 + n) % src.num_blocks
                    d = (np.arange(n) + 7) % dst.num_blocks
                pairs = np.stack([s, d], 1)
                if form == "list":
                    pairs = pairs.tolist()
                elif form == "tuple":
                    pairs = tuple(map(tuple, pairs.tolist()))
                for layers in (None, 0, [1], (0, 1), [], [1, 0]):
                    for _ in range(2):  # the second call uses the cached pool-pair checks
                        fast = _outcome(build_plan, src, dst, pairs, layers)
                        slow = _outcome(_general, src, dst, pairs, layers)
                        assert fast == slow, (s_name, d_name, pairs, layers)
                        checked += 1
    assert checked > 1000


def test_segment_lists_match_segments_on_large_plans():
    """Plans past the small path (numpy-built) give the same copies as lists as as arrays."""
    rng = np.random.default_rng(11)
    a, b = np.zeros((2, 300, 16), np.float32), np.zeros((2, 300, 16), np.float32)
    kv = np.zeros((2, 2, 300, 16), np.float32)
    pools = {"a": BlockPool.from_array(a), "b": BlockPool.from_array(b),
             "kv": BlockPool.from_array(kv, block_dim=2), "kv2": BlockPool.from_array(kv.copy(), block_dim=2),
             "strided": BlockPool.from_pointers([b.ctypes.data, b.ctypes.data + 8], 150, 64, 128, owner=b)}
    for s_name, d_name in [("a", "b"), ("kv", "kv2"), ("strided", "a"), ("a", "strided")]:
        src, dst = pools[s_name], pools[d_name]
        n = min(src.num_blocks, dst.num_blocks)
        assert n > plan_mod._SMALL
        for form in ("scattered", "runs"):
            if form == "runs":
                pairs = np.stack([np.arange(n), np.arange(n)], 1)
            else:
                pairs = np.stack([rng.permutation(src.num_blocks)[:n], rng.permutation(dst.num_blocks)[:n]], 1)
            for layers in (None, [1, 0]) if src.num_layers == dst.num_layers else ([0],):
                plan = plan_mod._general_plan(src, dst, pairs, layers)
                assert [list(x) for x in plan.segment_lists()] == [x.tolist() for x in plan.segments()]


@pytest.mark.parametrize(
    "pairs, layers",
    [
        ([[1, 2], [3, 2]], [0]),  # dst written twice
        ([[-1, 2]], [0]),
        ([[1, 40]], [0]),
        ([[40, 1]], [0]),
        ([[1, 2]], [3]),  # layer out of range
        ([[1, 2]], [-1]),
        ([[1, 2]], [0, 0]),
        ([[1, 2]], [True]),
        ([[1, 2]], 1.0),
        ([[1.0, 2]], [0]),
        ([[1, 2, 3]], [0]),
        (np.array([[1, 2]], np.float32), [0]),
        (np.array([[2**63, 1]], np.uint64), [0]),
        ([[2**70, 1]], [0]),
        (None, [0]),
    ],
)
def test_bad_small_requests_raise_the_general_error(pools, pairs, layers):
    src, dst = pools["a"], pools["b"]
    fast = _outcome(build_plan, src, dst, pairs, layers)
    slow = _outcome(_general, src, dst, pairs, layers)
    assert fast[0] == "error" and fast == slow


def test_same_pool_overlap_is_refused(pools):
    a = pools["a"]
    with pytest.raises(ValueError, match="both a source and a destination"):
        build_plan(a, a, [[1, 2], [2, 3]], [0])


def test_pool_pair_checks_are_not_cached_when_they_fail(pools):
    ro = np.zeros((3, 40, 16), np.float32)
    ro.flags.writeable = False
    ro_pool = BlockPool.from_array(ro)
    f16 = BlockPool.from_array(np.zeros((3, 40, 32), np.float16))
    for _ in range(2):
        with pytest.raises(ValueError, match="read-only"):
            build_plan(pools["a"], ro_pool, [[1, 2]], [0])
        with pytest.raises(ValueError, match="dtypes differ"):
            build_plan(pools["a"], f16, [[1, 2]], [0])


def test_small_plan_split_covers_the_job(pools):
    src, dst = pools["a"], pools["b"]
    pairs = [[i, (i * 7) % 40] for i in range(30)] + [[39, 10]]
    plan = build_plan(src, dst, pairs, [0, 1, 2])
    for parts in (2, 3):  # by layers
        chunks = _split(plan, parts)
        assert np.concatenate([c.layers for c in chunks]).tolist() == [0, 1, 2]
        for c in chunks:
            assert c.runs.tolist() == plan.runs.tolist()
    plan = build_plan(src, dst, pairs, [1])
    for parts in (2, 3):  # by runs
        chunks = _split(plan, parts)
        assert len(chunks) == parts
        assert np.concatenate([c.runs for c in chunks]).tolist() == plan.runs.tolist()
        assert np.concatenate([c.src_ids for c in chunks]).tolist() == plan.src_ids.tolist()
        assert np.concatenate([c.dst_ids for c in chunks]).tolist() == plan.dst_ids.tolist()


@pytest.mark.parametrize("dtype", ["<i8", ">i8", "<i4", "u1", "<u8", "i2"])
@pytest.mark.parametrize("bad", ["none", "neg_src", "neg_dst", "big_src", "big_dst", "twice"])
def test_array_ranges_match_general_path(pools, dtype, bad):
    """Arrays of more than 16 pairs are range-checked with numpy (negative ids wrap around)."""
    x = np.stack([np.arange(20), (np.arange(20) * 3) % 40], 1)
    if bad == "neg_src":
        x[5, 0] = -1
    elif bad == "neg_dst":
        x[7, 1] = -3
    elif bad == "big_src":
        x[9, 0] = 40
    elif bad == "big_dst":
        x[2, 1] = 41
    elif bad == "twice":
        x[3, 1] = x[4, 1] = 39
    pairs = x.astype(dtype)
    src, dst = pools["a"], pools["b"]
    for p in (pairs, pairs[::-1], np.asfortranarray(pairs)):
        assert _outcome(build_plan, src, dst, p, [2]) == _outcome(_general, src, dst, p, [2])
