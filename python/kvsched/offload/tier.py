"""``HostTier``: the scheduler side's index of the host tier.

Keyed by block hash (bytes; vLLM's ``BlockHash``), full blocks only. Each entry owns one host
slot (a block of the workers' host pools) and is in one of two states:

* STORING: a store into its slot is planned or running. Never a hit (a block is never served
  before its store completed). A failed or cancelled store drops the entry and frees the slot.
* READY: the store completed on every worker. A hit for lookups.

Entries that a transfer is using are pinned (a STORING entry always; a READY entry while loads
read it) and are never evicted. A failed load drops the entry (its bytes may be bad), once the
last load reading it has ended.

Eviction: least recently used, by request (the policy vLLM's offloading calls "lru"). Every
entry has a rank; the unpinned READY entry with the smallest rank goes first. A request that
stores or loads a block gives it the provisional rank ``(request rank, -position)``: the
request's rank is taken when it first uses the tier, and within one request the tail (larger
position) ranks below the head. When the request finishes, its blocks get fresh ranks, tail
first, so its head is the most recently used block of the tier. Lookups do not change ranks.
Selection is a lazy min-heap: O(log n) per eviction and per rank change.

Not thread-safe: the engine's scheduler calls it from one thread.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Sequence

from kvsched.errors import InvalidArgumentError

__all__ = ["HostTier"]

_STORING, _READY = 0, 1


class _Entry:
    __slots__ = ("slot", "state", "pins", "doomed", "rank")

    def __init__(self, slot: int, rank: tuple[int, int]) -> None:
        self.slot = slot
        self.state = _STORING
        self.pins = 1  # the store's pin
        self.doomed = False  # drop when the last pin goes (a load of it failed)
        self.rank = rank

    @property
    def evictable(self) -> bool:
        return self.state == _READY and self.pins == 0


class HostTier:
    """Index of ``capacity`` host blocks. See the module docstring for the states."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidArgumentError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._entries: dict[bytes, _Entry] = {}
        self._free = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self._heap: list[tuple[tuple[int, int], bytes]] = []  # (rank, key), lazily invalidated
        self._next_rank = 0
        self._request_rank: dict[str, int] = {}
        self.evictions = 0

    # ------------------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def is_ready(self, key: bytes) -> bool:
        e = self._entries.get(key)
        return e is not None and e.state == _READY and not e.doomed

    def is_storing(self, key: bytes) -> bool:
        """True while a store of ``key`` runs (it may become a hit soon)."""
        e = self._entries.get(key)
        return e is not None and e.state == _STORING and not e.doomed

    def slot_of(self, key: bytes) -> int | None:
        e = self._entries.get(key)
        return None if e is None else e.slot

    def count_hits(self, keys: Sequence[bytes], start: int = 0, limit: int | None = None) -> int:
        """Consecutive READY entries among ``keys[start:limit]``, from ``start``: the longest
        prefix of hits (ranks unchanged)."""
        end = len(keys) if limit is None else min(limit, len(keys))
        n = 0
        entries = self._entries
        for i in range(start, end):
            e = entries.get(keys[i])
            if e is None or e.state != _READY or e.doomed:
                break
            n += 1
        return n

    # ------------------------------------------------------------------------------ recency

    def _rank_of_request(self, req: str | None) -> int:
        if req is None:
            self._next_rank += 1
            return self._next_rank
        r = self._request_rank.get(req)
        if r is None:
            self._next_rank += 1
            r = self._request_rank[req] = self._next_rank
        return r

    def _set_rank(self, key: bytes, e: _Entry, rank: tuple[int, int]) -> None:
        e.rank = rank
        if e.evictable:
            heapq.heappush(self._heap, (rank, key))

    def access(self, req: str | None, keys: Sequence[bytes], first_position: int) -> None:
        """Request ``req`` uses ``keys`` (positions ``first_position``, ...): each ranks at least
        ``(request rank, -position)``."""
        base = self._rank_of_request(req)
        for i, key in enumerate(keys):
            e = self._entries.get(key)
            if e is not None:
                rank = (base, -(first_position + i))
                if e.rank < rank:
                    self._set_rank(key, e, rank)

    def finish_request(self, req: str, keys: Sequence[bytes]) -> None:
        """Request ``req`` ended; ``keys``: the blocks it used, head first. They become the most
        recently used, the head most of all."""
        self._request_rank.pop(req, None)
        for key in reversed(keys):
            e = self._entries.get(key)
            if e is not None:
                self._next_rank += 1
                self._set_rank(key, e, (self._next_rank, 0))

    def _pop_victim(self) -> tuple[bytes, _Entry] | None:
        heap, entries = self._heap, self._entries
        while heap:
            rank, key = heapq.heappop(heap)
            e = entries.get(key)
            if e is not None and e.rank == rank and e.evictable and not e.doomed:
                return key, e
        return None

    def _became_evictable(self, key: bytes, e: _Entry) -> None:
        if e.evictable:
            heapq.heappush(self._heap, (e.rank, key))
            if len(self._heap) > 4 * max(len(self._entries), 16):  # drop stale heap entries
                self._heap = [(x.rank, k) for k, x in self._entries.items() if x.evictable]
                heapq.heapify(self._heap)

    @property
    def pinned(self) -> int:
        return sum(1 for e in self._entries.values() if e.pins)

    # ------------------------------------------------------------------------------ loads

    def pin_for_load(self, keys: Iterable[bytes], req: str | None = None, first_position: int = 0) -> list[int]:
        """Pin READY entries for a load by ``req`` (their positions from ``first_position``);
        returns their slots. Raises if one is not READY."""
        keys = list(keys)
        for k in keys:
            if not self.is_ready(k):
                raise InvalidArgumentError(f"block {k.hex()[:16]} is not a hit in the host tier")
        slots = []
        for k in keys:
            e = self._entries[k]
            e.pins += 1
            slots.append(e.slot)
        self.access(req, keys, first_position)
        return slots

    def end_load(self, keys: Iterable[bytes], ok: bool) -> None:
        """Unpin after a load; a failed load drops the entries (once no transfer uses them)."""
        for k in keys:
            e = self._entries.get(k)
            if e is None:
                continue
            e.pins -= 1
            if not ok:
                e.doomed = True
            if e.doomed and e.pins == 0:
                self._drop(k, e)
            else:
                self._became_evictable(k, e)

    # ------------------------------------------------------------------------------ stores

    def reserve_store(self, key: bytes, req: str | None = None, position: int = 0) -> int | None:
        """A slot for storing ``key`` (block ``position`` of request ``req``), or None when the
        key is already in the tier (stored or being stored) or every slot is pinned. May evict
        the unpinned READY entry of smallest rank."""
        if key in self._entries:
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = self._pop_victim()
            if victim is None:
                return None
            del self._entries[victim[0]]
            slot = victim[1].slot
            self.evictions += 1
        self._entries[key] = _Entry(slot, (self._rank_of_request(req), -position))
        return slot

    def end_store(self, key: bytes, ok: bool) -> None:
        """The store of ``key`` ended on every worker: READY on success, else dropped."""
        e = self._entries.get(key)
        if e is None or e.state != _STORING:
            return
        e.pins -= 1
        if ok and not e.doomed:
            e.state = _READY
            self._became_evictable(key, e)
        else:
            e.doomed = True
            if e.pins == 0:
                self._drop(key, e)

    # ------------------------------------------------------------------------------ internal

    def _drop(self, key: bytes, e: _Entry) -> None:
        del self._entries[key]
        self._free.append(e.slot)

    def clear(self) -> int:
        """Drop every unpinned entry (an engine's cache reset); returns how many."""
        drop = [k for k, e in self._entries.items() if e.pins == 0]
        for k in drop:
            self._drop(k, self._entries[k])
        for e in self._entries.values():
            e.doomed = True
        self._heap = []
        return len(drop)

    def __repr__(self) -> str:
        return f"HostTier(capacity={self.capacity}, entries={len(self._entries)}, evictions={self.evictions})"
