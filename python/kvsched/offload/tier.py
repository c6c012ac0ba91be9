"""``HostTier``: the scheduler side's index of the host tier.

Keyed by block hash (bytes; vLLM's ``BlockHash``), full blocks only. Each entry owns one host
slot (a block of the workers' host pools) and is in one of two states:

* STORING: a store into its slot is planned or running. Never a hit (a block is never served
  before its store completed). A failed or cancelled store drops the entry and frees the slot.
* READY: the store completed on every worker. A hit for lookups.

Entries that a transfer is using are pinned (a STORING entry always; a READY entry while loads
read it) and are never evicted. Eviction takes the least recently used unpinned READY entry;
a lookup hit, a load and a completed store make an entry the most recently used. A failed load
drops the entry (its bytes may be bad), once the last load reading it has ended.

Not thread-safe: the engine's scheduler calls it from one thread.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

from kvsched.errors import InvalidArgumentError

__all__ = ["HostTier"]

_STORING, _READY = 0, 1


class _Entry:
    __slots__ = ("slot", "state", "pins", "doomed")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.state = _STORING
        self.pins = 1  # the store's pin
        self.doomed = False  # drop when the last pin goes (a load of it failed)


class HostTier:
    """Index of ``capacity`` host blocks. See the module docstring for the states."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidArgumentError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        # LRU order: least recently used first. Pinned entries stay in the order; eviction skips
        # them (a scan bounded by the number of pinned entries, which transfers bound).
        self._entries: "OrderedDict[bytes, _Entry]" = OrderedDict()
        self._free = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
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
        prefix of hits. Hits become the most recently used."""
        end = len(keys) if limit is None else min(limit, len(keys))
        n = 0
        entries = self._entries
        for i in range(start, end):
            e = entries.get(keys[i])
            if e is None or e.state != _READY or e.doomed:
                break
            entries.move_to_end(keys[i])
            n += 1
        return n

    @property
    def pinned(self) -> int:
        return sum(1 for e in self._entries.values() if e.pins)

    # ------------------------------------------------------------------------------ loads

    def pin_for_load(self, keys: Iterable[bytes]) -> list[int]:
        """Pin READY entries for a load; returns their slots. Raises if one is not READY."""
        keys = list(keys)
        for k in keys:
            if not self.is_ready(k):
                raise InvalidArgumentError(f"block {k.hex()[:16]} is not a hit in the host tier")
        slots = []
        for k in keys:
            e = self._entries[k]
            e.pins += 1
            self._entries.move_to_end(k)
            slots.append(e.slot)
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

    # ------------------------------------------------------------------------------ stores

    def reserve_store(self, key: bytes) -> int | None:
        """A slot for storing ``key``, or None when the key is already in the tier (stored or
        being stored) or every slot is pinned. May evict the LRU unpinned READY entry."""
        if key in self._entries:
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                return None
            slot = self._entries.pop(victim).slot
            self.evictions += 1
        self._entries[key] = _Entry(slot)
        return slot

    def end_store(self, key: bytes, ok: bool) -> None:
        """The store of ``key`` ended on every worker: READY on success, else dropped."""
        e = self._entries.get(key)
        if e is None or e.state != _STORING:
            return
        e.pins -= 1
        if ok and not e.doomed:
            e.state = _READY
            self._entries.move_to_end(key)
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
        return len(drop)

    def __repr__(self) -> str:
        return f"HostTier(capacity={self.capacity}, entries={len(self._entries)}, evictions={self.evictions})"
