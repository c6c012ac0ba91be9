// Decided SCHEDULED operations waiting to be taken by Scheduler::poll (contract section 3,
// docs/contract.md, `poll`).
//
// Contract
//   - Blocking with timeout (mutex + condition variable): poll() is the executor's blocking entry
//     point, so it needs a sleeping wait anyway; push() is a short critical section.
//   - Each op is handed out once: pop() claims delivery with an exchange on Op::delivered, so an
//     op already delivered through wait/decision is skipped.
//   - Bounded: at most `capacity` entries; push() returns the evicted oldest entry (if any) so the
//     scheduler can fail it as dropped when nobody holds it (docs/semantics.md, "Backlog").
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <utility>
#include <vector>

#include "op.hpp"
#include "sync.hpp"

namespace kvsched::core {

class PollQueue {
 public:
  explicit PollQueue(size_t capacity) : capacity_(capacity == 0 ? 1 : capacity) {}

  OpPtr push(OpPtr op) {
    OpPtr evicted;
    {
      std::lock_guard<Mutex> lock(mu_);
      // Entries whose decision was delivered meanwhile (wait/decision on the handle) would only
      // be skipped by pop(): drop them from the front now, so a caller that reads decisions
      // directly does not keep a backlog of ended operations alive. Dropping an entry releases
      // only the queue's shared_ptr; it is not a view, and a delivered op is checked for a drop
      // when its last handle object goes, not here.
      // order: relaxed — a hint: a stale `false` keeps the entry for pop() to skip.
      while (!queue_.empty() && queue_.front()->delivered.load(std::memory_order_relaxed))
        queue_.pop_front();
      if (queue_.size() >= capacity_) {
        evicted = std::move(queue_.front());
        queue_.pop_front();
      }
      queue_.push_back(std::move(op));
    }
    cv_.notify_one();
    return evicted;
  }

  // Waits until something is available, the queue is closed, or `deadline` passes.
  //
  // Each returned op carries one view reference "in transit" (Op::views incremented before its
  // delivery is claimed): the binding layer adopts it into a handle object. Without it, the last
  // old handle object of the op could be collected between the claim and the new handle, and
  // would see "delivered, no view" and fail the op as dropped. See Note [handle views].
  // Ops found already delivered are appended to `skipped` with their transit reference released;
  // the caller re-checks them for a drop (their last view may have gone meanwhile).
  template <class Clock, class Duration>
  std::vector<OpPtr> pop(size_t max_items, std::chrono::time_point<Clock, Duration> deadline,
                         std::vector<OpPtr>* skipped) {
    std::vector<OpPtr> out;
    std::unique_lock<Mutex> lock(mu_);
    for (;;) {
      // Closed: nothing is handed out any more (Scheduler::close fails what nobody holds).
      if (closed_) return out;
      while (!queue_.empty() && out.size() < max_items) {
        OpPtr op = std::move(queue_.front());
        queue_.pop_front();
        // order: acq_rel — the transit view must be visible before the delivery claim below is
        // (release of the exchange), pairs with Scheduler::on_handle_dropped's acquire loads.
        op->views.fetch_add(1, std::memory_order_acq_rel);
        // order: acq_rel — claims delivery exactly once against Scheduler::deliver(); acquire
        // sees the decision published before the op was pushed.
        if (!op->delivered.exchange(true, std::memory_order_acq_rel)) {
          out.push_back(std::move(op));
        } else {
          // order: acq_rel — gives the transit view back; pairs as above.
          op->views.fetch_sub(1, std::memory_order_acq_rel);
          skipped->push_back(std::move(op));
        }
      }
      if (!out.empty() || max_items == 0) return out;
      // A deadline already passed (poll(timeout=0), the executor's non-blocking try) returns at
      // once, without a condition-variable call.
      if (Clock::now() >= deadline) return out;
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
        if (queue_.empty()) return out;
      }
    }
  }

  void close() {
    {
      std::lock_guard<Mutex> lock(mu_);
      closed_ = true;
    }
    cv_.notify_all();
  }

  // Takes every queued op out (used by Scheduler::close(): nobody can poll any more).
  std::deque<OpPtr> drain() {
    std::lock_guard<Mutex> lock(mu_);
    return std::exchange(queue_, {});
  }

  size_t size() const {
    std::lock_guard<Mutex> lock(mu_);
    return queue_.size();
  }

 private:
  const size_t capacity_;
  mutable Mutex mu_;
  CondVar cv_;
  std::deque<OpPtr> queue_;
  bool closed_ = false;
};

}  // namespace kvsched::core
