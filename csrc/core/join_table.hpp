// JoinTable: uuid -> Op, the table where the two halves of an operation meet (contract S1).
//
// Contract
//   - Sharded by uuid hash (a power of two of shards, each padded to its own cache lines): a
//     call locks one shard, a batch locks every shard it touches in address order (lock_order),
//     so two batches never wait for each other in a cycle.
//   - Holds live operations, held outcomes and held cancels; an entry leaves with its slot
//     (remove_slot) or when the registry forgets a held half (erase_unjoined).
//   - Lock: one short mutex per shard. Lock order: slot -> shard -> rid registry -> removed-uuid
//     memory (docs/design.md "Where locks are").
#pragma once

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "op.hpp"
#include "sync.hpp"
#include "types.hpp"

namespace kvsched::core {

class JoinTable {
 public:
  struct alignas(128) Shard {
    Mutex mu;
    std::unordered_map<Uuid, OpPtr, UuidHash> map;  // guarded by mu
  };

  // Each shard on cache lines of its own (two 64-byte lines: adjacent-line prefetch), so threads
  // working on different shards never share a line.
  static_assert(alignof(Shard) == 128 && sizeof(Shard) % 128 == 0, "shards must be padded");

  explicit JoinTable(size_t shards) : shards_(std::max<size_t>(1, shards)) {
    if ((shards_.size() & (shards_.size() - 1)) != 0)
      throw Error(ErrorCode::kInvalidArgument, "join_shards must be a power of two");
    for (auto& sh : shards_) sh.map.reserve(64);
  }

  Shard& shard(const Uuid& u) { return shards_[UuidHash{}(u) & (shards_.size() - 1)]; }

  // The distinct shards of `uuids`, in the one order batches lock them.
  std::vector<Shard*> lock_order(const std::vector<Uuid>& uuids) {
    std::vector<Shard*> order;
    order.reserve(uuids.size());
    for (const Uuid& u : uuids) order.push_back(&shard(u));
    std::sort(order.begin(), order.end());
    order.erase(std::unique(order.begin(), order.end()), order.end());
    return order;
  }

  // Removes `op`'s entry if it is still that op's.
  void erase(const OpPtr& op) {
    Shard& sh = shard(op->uuid);
    std::lock_guard<Mutex> lock(sh.mu);
    auto it = sh.map.find(op->uuid);
    if (it != sh.map.end() && it->second == op) sh.map.erase(it);
  }

  // Removes `op`'s entry unless a worker half claimed it meanwhile (it then belongs to a slot and
  // leaves the table with it). Returns true when it removed it.
  bool erase_unjoined(const OpPtr& op) {
    Shard& sh = shard(op->uuid);
    std::lock_guard<Mutex> lock(sh.mu);
    auto it = sh.map.find(op->uuid);
    // order: relaxed — worker claims are made only under this shard lock (held).
    if (it == sh.map.end() || it->second != op ||
        (op->halves.load(std::memory_order_relaxed) & Op::kWorkerClaimed) != 0)
      return false;
    sh.map.erase(it);
    return true;
  }

  // Every operation in the table (close()).
  std::vector<OpPtr> snapshot() {
    std::vector<OpPtr> out;
    for (auto& sh : shards_) {
      std::lock_guard<Mutex> lock(sh.mu);
      for (auto& kv : sh.map) out.push_back(kv.second);
    }
    return out;
  }

 private:
  std::vector<Shard> shards_;
};

}  // namespace kvsched::core
