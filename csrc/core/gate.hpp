// Joined operations whose requirement does not hold yet, ordered by requirement.
//
// Contract
//   - Blocking (one short mutex). Progress marks happen a few times per layer, not per op, so a
//     lock costs nothing measurable and makes the "no op stranded" argument simple: add() re-checks
//     the requirement under the lock, and release_upto() runs under the same lock after the new
//     position was stored, so an op is either seen by the release or sees the new position.
//   - Memory: one entry per gated op; cancelled ops are erased by erase().
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "op.hpp"
#include "progress.hpp"
#include "sync.hpp"

namespace kvsched::core {

class Gate {
 public:
  // Returns true if the op was parked, or was decided meanwhile (nothing left to do); false if its
  // requirement already holds (the caller makes it ready).
  bool add_unless_ready(const OpPtr& op, const Progress& progress) {
    std::lock_guard<Mutex> lock(mu_);
    if (progress.holds(op->requirement)) return false;
    // A CANCEL decided after the caller's own check would erase() before this insert and miss it,
    // leaving a cancelled op parked (found by test_dsched, scenario cancel). decide() makes its CAS
    // before it takes this lock in erase(), so re-checking here closes the gap: either erase()
    // runs after this insert, or this check sees the decision.
    if (op->load_decision() != Decision::kNone) return true;
    waiting_.emplace(op->requirement, op);
    return true;
  }

  std::vector<OpPtr> release_upto(uint64_t position) {
    std::vector<OpPtr> out;
    std::lock_guard<Mutex> lock(mu_);
    auto end = waiting_.upper_bound(position);
    for (auto it = waiting_.begin(); it != end; ++it) out.push_back(std::move(it->second));
    waiting_.erase(waiting_.begin(), end);
    return out;
  }

  void erase(const OpPtr& op) {
    std::lock_guard<Mutex> lock(mu_);
    auto range = waiting_.equal_range(op->requirement);
    for (auto it = range.first; it != range.second; ++it) {
      if (it->second == op) {
        waiting_.erase(it);
        return;
      }
    }
  }

  size_t size() const {
    std::lock_guard<Mutex> lock(mu_);
    return waiting_.size();
  }

 private:
  mutable Mutex mu_;
  std::multimap<uint64_t, OpPtr> waiting_;
};

}  // namespace kvsched::core
