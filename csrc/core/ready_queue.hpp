// Operations that are joined and whose requirement holds, waiting only for a token.
//
// Contract
//   - Not thread-safe by itself: the scheduler guards it with its ready lock (blocking, short).
//     A lock is the honest choice here: the pick is a priority decision across two heaps plus an
//     aging rule, which no single atomic can make. The fast path (queue empty, token free) never
//     touches it. `queued` is readable without the lock (Note [token handshake]).
//   - Order (S3): LOAD before STORE; within a kind the earlier requirement, then arrival order;
//     a STORE at the head of its heap that has waited longer than `store_starvation_ns` goes
//     first, so a steady stream of loads cannot starve stores. The bound is on the head of the
//     store heap: each store reaches the head after finitely many earlier ones.
//   - Cancelled ops stay in the heaps until popped (their decision CAS then fails); memory is
//     bounded by the ops ever made ready and not yet popped.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "op.hpp"
#include "sync.hpp"

namespace kvsched::core {

class ReadyQueue {
 public:
  explicit ReadyQueue(int64_t store_starvation_ns) : store_starvation_ns_(store_starvation_ns) {}

  void push(OpPtr op) {
    auto& heap = op->kind == Kind::kLoad ? loads_ : stores_;
    heap.push_back(std::move(op));
    std::push_heap(heap.begin(), heap.end(), Later{});
    // order: seq_cst — Note [token handshake]: this store must not be reordered after the
    // enqueuer's following try_acquire().
    queued_.fetch_add(1, std::memory_order_seq_cst);
  }

  // Precondition: !empty().
  OpPtr pop(int64_t now_ns) {
    bool take_store = loads_.empty();
    if (!take_store && !stores_.empty() &&
        now_ns - stores_.front()->ready_ns > store_starvation_ns_)
      take_store = true;
    auto& heap = take_store ? stores_ : loads_;
    std::pop_heap(heap.begin(), heap.end(), Later{});
    OpPtr op = std::move(heap.back());
    heap.pop_back();
    // order: relaxed — only the lock holder decrements; readers outside the lock only need to see
    // increments in time (Note [token handshake]), and a stale non-zero costs one empty pump.
    queued_.fetch_sub(1, std::memory_order_relaxed);
    return op;
  }

  bool empty() const { return loads_.empty() && stores_.empty(); }

  uint64_t queued() const {
    // order: seq_cst — Note [token handshake].
    return queued_.load(std::memory_order_seq_cst);
  }

 private:
  // Heap comparator: true when a should come out after b.
  struct Later {
    bool operator()(const OpPtr& a, const OpPtr& b) const {
      if (a->requirement != b->requirement) return a->requirement > b->requirement;
      return a->ready_seq > b->ready_seq;
    }
  };

  const int64_t store_starvation_ns_;
  std::vector<OpPtr> loads_;
  std::vector<OpPtr> stores_;
  Atomic<uint64_t> queued_{0};
};

}  // namespace kvsched::core
