// The removed-uuid memory (SPEC S6, docs/semantics.md "Cancel, remove, reuse"): the uuids of
// removed slots, oldest forgotten first once more than `capacity` are remembered.
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

  size_t home(const Uuid& u) const { return UuidHash{}(u) & (keys_.size() - 1); }
  size_t next(size_t i) const { return (i + 1) & (keys_.size() - 1); }

  size_t find(const Uuid& u) const {
    for (size_t i = home(u); used_[i]; i = next(i))
      if (keys_[i] == u) return i;
    return kNotFound;
  }

  void insert(const Uuid& u) {
    size_t i = home(u);
    while (used_[i]) i = next(i);
    keys_[i] = u;
    used_[i] = 1;
  }

  // Backward-shift deletion: later members of the probe run move into the hole when their home
  // slot does not lie cyclically in (hole, their position], so no tombstones are needed.
  void erase(const Uuid& u) {
    size_t hole = find(u);
    if (hole == kNotFound) return;
    for (size_t j = next(hole); used_[j]; j = next(j)) {
      const size_t h = home(keys_[j]);
      const bool stays = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
      if (stays) continue;
      keys_[hole] = keys_[j];
      hole = j;
    }
    used_[hole] = 0;
  }

  void rehash(size_t slots) {
    keys_.assign(slots, Uuid{});
    used_.assign(slots, 0);
    for (const Uuid& u : order_) insert(u);
  }

  const size_t capacity_;
  std::vector<Uuid> keys_;
  std::vector<uint8_t> used_;
  std::deque<Uuid> order_;  // oldest first
};

}  // namespace kvsched::core
