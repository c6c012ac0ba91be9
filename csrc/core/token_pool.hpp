// Concurrency tokens for max_inflight (contract S3, docs/contract.md).
//
// Contract
//   - try_acquire() is lock-free (CAS loop), release() wait-free (one fetch_add).
//   - At most `capacity` tokens are held at any time: available never goes below 0.
//   - Both use seq_cst: see Note [token handshake] in docs/design.md. A releaser stores
//     `available` then loads the ready queue's `queued` count; an enqueuer stores `queued` then
//     tries to acquire. seq_cst on all four accesses forbids the outcome where both miss each
//     other (the store-buffering pattern), which would strand a ready op with a free token.
#pragma once

#include <cstdint>

#include "sync.hpp"

namespace kvsched::core {

class TokenPool {
 public:
  explicit TokenPool(int64_t capacity) : capacity_(capacity), available_(capacity) {}

  bool try_acquire() {
    // order: seq_cst — Note [token handshake].
    int64_t cur = available_.load(std::memory_order_seq_cst);
    while (cur > 0) {
      // order: seq_cst — Note [token handshake]; failure reloads cur.
      if (available_.compare_exchange_weak(cur, cur - 1, std::memory_order_seq_cst,
                                           std::memory_order_seq_cst))
        return true;
    }
    return false;
  }

  void release() {
    // order: seq_cst — Note [token handshake].
    available_.fetch_add(1, std::memory_order_seq_cst);
  }

  int64_t in_use() const {
    // order: relaxed — statistic only.
    return capacity_ - available_.load(std::memory_order_relaxed);
  }
  int64_t capacity() const { return capacity_; }

 private:
  const int64_t capacity_;
  Atomic<int64_t> available_;
};

}  // namespace kvsched::core
