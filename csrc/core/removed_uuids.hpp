// The removed-uuid memory (contract S6 in docs/contract.md; docs/semantics.md "Cancel, remove,
// reuse"): the uuids of removed slots, oldest forgotten first once more than `capacity` are
// remembered.
//
// Contract
//   - Not thread-safe: the scheduler guards it with one mutex (Scheduler::removed_mu_).
//   - contains/add are O(1) expected; memory is O(capacity) and grows only as uuids are added.
//
// Why not tombstones in the join table: the join table is looked up by every call of both
// halves, and 65,536 tombstones (the default memory) spread over its shards made each lookup a
// walk through cold memory: the core's op throughput halved. Here the remembered uuids are 16
// bytes each in one open-addressing table (linear probing, at most half full), so a lookup is
// one probe sequence in contiguous memory, and the live join table only holds live operations.
//
// Each slot also has a one-byte tag (0: empty, else 1..255 from the hash's top bits), in an array
// of its own that is 16 times smaller than the keys (256 KiB at the default 65,536 uuids). A probe
// reads a slot's key only when its tag matches, so the common lookup, a uuid that was never
// removed, touches no key at all: the keys' cache misses were most of the core's time per op
// lifecycle (measured with perf on bench_core).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <vector>

#include "types.hpp"

namespace kvsched::core {

class RemovedUuids {
 public:
  explicit RemovedUuids(size_t capacity) : capacity_(capacity) { rehash(16); }

  bool contains(const Uuid& u) const { return find(u) != kNotFound; }

  // Remembers `u` (no-op when already remembered). Returns how many uuids were forgotten to stay
  // within capacity (0 or 1).
  size_t add(const Uuid& u) {
    if (capacity_ == 0) return 1;  // remembers nothing: forgotten at once
    if (contains(u)) return 0;
    if (2 * (order_.size() + 1) > keys_.size()) rehash(2 * keys_.size());
    insert(u);
    order_.push_back(u);
    if (order_.size() <= capacity_) return 0;
    erase(order_.front());
    order_.pop_front();
    return 1;
  }

  size_t size() const { return order_.size(); }

 private:
  static constexpr size_t kNotFound = ~size_t{0};

  static size_t hash(const Uuid& u) { return UuidHash{}(u); }
  // Home slot from the low bits, tag from the top byte (never 0, the empty mark).
  size_t home_of(size_t h) const { return h & (keys_.size() - 1); }
  size_t home(const Uuid& u) const { return home_of(hash(u)); }
  static uint8_t tag_of(size_t h) {
    return static_cast<uint8_t>(1 + (h >> (8 * sizeof(size_t) - 8)) % 255);  // the top byte
  }
  size_t next(size_t i) const { return (i + 1) & (keys_.size() - 1); }

  size_t find(const Uuid& u) const {
    const size_t h = hash(u);
    const uint8_t tag = tag_of(h);
    for (size_t i = home_of(h); tags_[i]; i = next(i))
      if (tags_[i] == tag && keys_[i] == u) return i;
    return kNotFound;
  }

  void insert(const Uuid& u) {
    const size_t h = hash(u);
    size_t i = home_of(h);
    while (tags_[i]) i = next(i);
    keys_[i] = u;
    tags_[i] = tag_of(h);
  }

  // Backward-shift deletion: later members of the probe run move into the hole when their home
  // slot does not lie cyclically in (hole, their position], so no tombstones are needed.
  void erase(const Uuid& u) {
    size_t hole = find(u);
    if (hole == kNotFound) return;
    for (size_t j = next(hole); tags_[j]; j = next(j)) {
      const size_t h = home(keys_[j]);
      const bool stays = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
      if (stays) continue;
      keys_[hole] = keys_[j];
      tags_[hole] = tags_[j];
      hole = j;
    }
    tags_[hole] = 0;
  }

  void rehash(size_t slots) {
    keys_.assign(slots, Uuid{});
    tags_.assign(slots, 0);
    for (const Uuid& u : order_) insert(u);
  }

  const size_t capacity_;
  std::vector<Uuid> keys_;
  std::vector<uint8_t> tags_;  // 0: empty; else the key's tag (see tag_of)
  std::deque<Uuid> order_;  // oldest first
};

}  // namespace kvsched::core
