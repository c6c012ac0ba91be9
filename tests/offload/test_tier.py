"""HostTier: hits only after a completed store, pinning, LRU eviction, failures dropped."""

import pytest

from kvsched.errors import InvalidArgumentError
from kvsched.offload import HostTier


def k(i: int) -> bytes:
    return i.to_bytes(8, "little")


def stored(tier: HostTier, *keys: bytes) -> None:
    for key in keys:
        assert tier.reserve_store(key) is not None
        tier.end_store(key, True)


def test_hit_only_after_store_completed():
    tier = HostTier(4)
    slot = tier.reserve_store(k(1))
    assert slot == 0
    assert tier.count_hits([k(1)]) == 0  # STORING is never a hit
    assert tier.reserve_store(k(1)) is None  # already being stored
    tier.end_store(k(1), True)
    assert tier.count_hits([k(1)]) == 1


def test_failed_store_never_becomes_a_hit_and_frees_its_slot():
    tier = HostTier(1)
    tier.reserve_store(k(1))
    tier.end_store(k(1), False)
    assert k(1) not in tier and tier.count_hits([k(1)]) == 0
    assert tier.reserve_store(k(2)) == 0


def test_longest_prefix_from_start_and_limit():
    tier = HostTier(8)
    stored(tier, k(0), k(1), k(3))
    keys = [k(0), k(1), k(2), k(3)]
    assert tier.count_hits(keys) == 2
    assert tier.count_hits(keys, start=1) == 1
    assert tier.count_hits(keys, start=3) == 1
    assert tier.count_hits(keys, start=0, limit=1) == 1


def test_eviction_skips_pinned_entries():
    tier = HostTier(2)
    stored(tier, k(1), k(2))
    assert tier.reserve_store(k(3)) is not None  # evicts k(1), the least recently stored
    assert k(1) not in tier and tier.evictions == 1
    tier.end_store(k(3), True)
    tier.pin_for_load([k(2)])
    tier.pin_for_load([k(3)])
    assert tier.reserve_store(k(4)) is None  # every slot pinned by a load
    tier.end_load([k(3)], True)
    assert tier.reserve_store(k(4)) is not None  # k(3) evicted now, k(2) still pinned
    assert k(2) in tier and k(3) not in tier


def test_least_recently_used_request_first_tail_before_head():
    tier = HostTier(6)
    a = [k(10 + i) for i in range(3)]
    b = [k(20 + i) for i in range(3)]
    for i, key in enumerate(a):  # request A stores its 3 blocks, then B
        tier.reserve_store(key, "A", i)
        tier.end_store(key, True)
    for i, key in enumerate(b):
        tier.reserve_store(key, "B", i)
        tier.end_store(key, True)
    tier.finish_request("B", b)
    tier.finish_request("A", a)  # A finished last: its blocks are the most recent, head most
    order = []
    for i in range(6):
        tier.reserve_store(k(100 + i))
        order.append(next(x for x in a + b if x not in tier and x not in order))
    assert order == [b[2], b[1], b[0], a[2], a[1], a[0]]


def test_a_load_makes_blocks_recent_for_its_request():
    tier = HostTier(3)
    stored(tier, k(1), k(2), k(3))
    tier.pin_for_load([k(1)], "R", 0)  # R's rank is newer than every stored block
    tier.end_load([k(1)], True)
    tier.reserve_store(k(4))
    assert k(1) in tier and k(2) not in tier


def test_storing_entries_are_pinned():
    tier = HostTier(1)
    tier.reserve_store(k(1))
    assert tier.reserve_store(k(2)) is None


def test_failed_load_drops_the_entry_after_the_last_reader():
    tier = HostTier(2)
    stored(tier, k(1))
    tier.pin_for_load([k(1)])
    tier.pin_for_load([k(1)])
    tier.end_load([k(1)], False)
    assert tier.count_hits([k(1)]) == 0  # no new hits of a doomed entry
    assert k(1) in tier  # the other load still reads its slot
    tier.end_load([k(1)], True)
    assert k(1) not in tier


def test_pin_for_load_requires_ready_entries():
    tier = HostTier(2)
    tier.reserve_store(k(1))
    with pytest.raises(InvalidArgumentError):
        tier.pin_for_load([k(1)])
    with pytest.raises(InvalidArgumentError):
        HostTier(0)
