// Waiters: threads blocked until one operation is decided (Handle.wait, Scheduler::wait_decision).
//
// Contract
//   - A waiter registers in Op::waiters, then sleeps on one of 64 condition-variable stripes
//     (chosen by the op's address) until the op is decided, the deadline passes or `stop()`
//     holds. A decider calls notify(op) after its decision CAS: one load when nobody waits.
//   - Lock: one leaf mutex per stripe, held only around the predicate check and the notify
//     (nothing else is locked under it). Note [waiter handshake] in docs/design.md gives the
//     memory-ordering argument: seq_cst on the decision CAS, on `waiters`, and on the waiter's
//     decision load.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <vector>

#include "op.hpp"
#include "sync.hpp"

namespace kvsched::core {

class Waiters {
 public:
  using Clock = std::chrono::steady_clock;

  Waiters() : stripes_(64) {}

  // Wakes the waiters of `op` (call after its decision CAS).
  void notify(const Op& op) {
    // order: seq_cst — Note [waiter handshake]: after the seq_cst decision CAS, either we see the
    // waiter's increment, or the waiter's predicate check sees our decision.
    if (op.waiters.load(std::memory_order_seq_cst) == 0) return;
    Stripe& s = stripe_for(&op);
    { std::lock_guard<Mutex> lock(s.mu); }  // a waiter between its check and its sleep holds s.mu
    s.cv.notify_all();
  }

  // Sleeps until `op` is decided, `stop()` returns true, or `deadline`.
  template <class Stop>
  void wait(const OpPtr& op, Clock::time_point deadline, Stop stop) {
    // order: seq_cst — Note [waiter handshake].
    op->waiters.fetch_add(1, std::memory_order_seq_cst);
    Stripe& s = stripe_for(op.get());
    {
      std::unique_lock<Mutex> lock(s.mu);
      s.cv.wait_until(lock, deadline, [&] {
        // order: seq_cst — Note [waiter handshake].
        return op->decision.load(std::memory_order_seq_cst) !=
                   static_cast<uint8_t>(Decision::kNone) ||
               stop();
      });
    }
    // order: relaxed — only a hint for notify(); a stale non-zero costs one notify.
    op->waiters.fetch_sub(1, std::memory_order_relaxed);
  }

  // Wakes every waiter (close): each re-checks its predicate.
  void wake_all() {
    for (auto& s : stripes_) {
      { std::lock_guard<Mutex> lock(s.mu); }
      s.cv.notify_all();
    }
  }

 private:
  struct Stripe {
    Mutex mu;
    CondVar cv;
  };

  Stripe& stripe_for(const Op* op) {
    // Ops are 16-byte aligned and std::hash of a pointer is the identity in libstdc++: mix the
    // address so all stripes are used (found by the deterministic-schedule harness).
    uint64_t x = reinterpret_cast<uintptr_t>(op) >> 4;
    x *= 0x9e3779b97f4a7c15ULL;
    return stripes_[(x >> 32) % stripes_.size()];
  }

  std::vector<Stripe> stripes_;
};

}  // namespace kvsched::core
