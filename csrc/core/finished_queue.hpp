// FinishedQueue: slots whose last open operation ended, for take_finished() (contract S4).
//
// Contract
//   - push() is called by the thread whose decrement of Slot::open reached zero; take() hands
//     out everything pushed since the last take, oldest first. O(1) amortised per push, O(taken)
//     per take: the cost never grows with the number of open slots.
//   - Bounded for engines that never call take_finished (they track completion with
//     is_complete): past a threshold, entries of slots removed since are dropped (take() would
//     skip them anyway). The threshold is 1,024, then twice the compacted size.
//   - Lock: one mutex, held for the push, the swap in take(), and the compaction. Lock order:
//     this lock -> a slot's mutex (compaction reads Slot::removed); nothing takes them the other
//     way.
#pragma once

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

#include "slot.hpp"
#include "sync.hpp"

namespace kvsched::core {

class FinishedQueue {
 public:
  void push(std::shared_ptr<Slot> slot) {
    std::lock_guard<Mutex> lock(mu_);
    slots_.push_back(std::move(slot));
    if (slots_.size() < compact_at_) return;
    slots_.erase(std::remove_if(slots_.begin(), slots_.end(),
                                [](const std::shared_ptr<Slot>& s) {
                                  std::lock_guard<Mutex> slot_lock(s->mu);
                                  return s->removed;
                                }),
                 slots_.end());
    compact_at_ = std::max<size_t>(1024, 2 * slots_.size());
  }

  std::vector<std::shared_ptr<Slot>> take() {
    std::vector<std::shared_ptr<Slot>> out;
    std::lock_guard<Mutex> lock(mu_);
    out.swap(slots_);
    return out;
  }

  size_t size() const {
    std::lock_guard<Mutex> lock(mu_);
    return slots_.size();
  }

 private:
  mutable Mutex mu_;
  std::vector<std::shared_ptr<Slot>> slots_;  // guarded by mu_
  size_t compact_at_ = 1024;                  // guarded by mu_
};

}  // namespace kvsched::core
