// RidRegistry: what the scheduler remembers per request id outside its slot.
//
//   - pending transfer halves: SCHEDULED transfer halves that arrived for a rid, kept until the
//     rid's slot is removed or cancelled (cancel_slot must find the ones whose worker half has
//     not come);
//   - cancelled rids: least recently cancelled first, at most `memory` (contract S6: a transfer
//     half arriving later for a cancelled rid is decided CANCEL at once);
//   - held halves: transfer halves decided CANCEL before any worker half came (their rid was
//     cancelled, or they timed out), oldest first, at most `memory`; they stay in the join table
//     for a late worker half (docs/semantics.md). What falls out of the bound is handed back to
//     the caller, which takes it out of the join table.
//
// Contract
//   - Every method with the `_locked` suffix needs the registry's lock (lock()); the others take
//     it themselves. The lock is short: O(1) or O(halves of one rid).
//   - Lock order: a join-table shard lock may be held when taking this lock (schedule checks
//     "is the rid cancelled?" and registers the half in one step against cancel_slot), never the
//     other way round.
#pragma once

#include <algorithm>
#include <deque>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "op.hpp"
#include "sync.hpp"

namespace kvsched::core {

class RidRegistry {
 public:
  explicit RidRegistry(size_t memory) : memory_(std::max<size_t>(1, memory)) {}

  std::unique_lock<Mutex> lock() { return std::unique_lock<Mutex>(mu_); }

  // ---- cancelled rids ----
  bool is_cancelled_locked(const std::string& rid) const {
    return !cancelled_rids_.empty() && cancelled_rids_.count(rid) != 0;
  }
  void remember_cancelled_locked(const std::string& rid) {
    auto it = cancelled_rids_.find(rid);
    if (it != cancelled_rids_.end()) {
      // Cancelled again: it becomes the most recent (splice keeps the map's iterator valid).
      cancelled_order_.splice(cancelled_order_.end(), cancelled_order_, it->second);
      return;
    }
    cancelled_order_.push_back(rid);
    cancelled_rids_.emplace(rid, std::prev(cancelled_order_.end()));
    while (cancelled_order_.size() > memory_) {
      cancelled_rids_.erase(cancelled_order_.front());
      cancelled_order_.pop_front();
    }
  }
  // A new slot of the rid starts clean: it is no longer cancelled (its held halves stay: worker
  // halves of the new slot may still join them).
  void forget_cancelled(const std::string& rid) {
    std::lock_guard<Mutex> guard(mu_);
    auto it = cancelled_rids_.find(rid);
    if (it == cancelled_rids_.end()) return;
    cancelled_order_.erase(it->second);
    cancelled_rids_.erase(it);
  }

  // ---- pending transfer halves ----
  void add_pending_locked(const std::string& rid, const OpPtr& op) {
    pending_by_rid_[rid].push_back(op);
  }
  std::vector<OpPtr> take_pending_locked(const std::string& rid) {
    std::vector<OpPtr> out;
    auto it = pending_by_rid_.find(rid);
    if (it == pending_by_rid_.end()) return out;
    out = std::move(it->second);
    pending_by_rid_.erase(it);
    return out;
  }
  // After remove_slot: forget the rid's halves that joined or were decided; keep waiting ones
  // (they may belong to the next slot of the same rid, docs/semantics.md).
  void prune_pending(const std::string& rid) {
    std::lock_guard<Mutex> guard(mu_);
    auto it = pending_by_rid_.find(rid);
    if (it == pending_by_rid_.end()) return;
    auto& v = it->second;
    v.erase(std::remove_if(v.begin(), v.end(),
                           [](const OpPtr& op) {
                             // order: acquire — pairs with the publish fetch_ors.
                             return (op->halves.load(std::memory_order_acquire) &
                                     Op::kWorkerPublished) ||
                                    op->load_decision() != Decision::kNone;
                           }),
            v.end());
    if (v.empty()) pending_by_rid_.erase(it);
  }

  // ---- held halves ----
  void hold_locked(const OpPtr& op, std::vector<OpPtr>* evicted) {
    held_.push_back(op);
    while (held_.size() > memory_) {
      evicted->push_back(std::move(held_.front()));
      held_.pop_front();
    }
  }
  // Moves decided halves from the pending list to the held list.
  void hold_decided(const std::vector<OpPtr>& ops, std::vector<OpPtr>* evicted) {
    std::lock_guard<Mutex> guard(mu_);
    for (auto& op : ops) {
      auto it = pending_by_rid_.find(op->rid);
      if (it != pending_by_rid_.end()) {
        auto& v = it->second;
        v.erase(std::remove(v.begin(), v.end(), op), v.end());
        if (v.empty()) pending_by_rid_.erase(it);
      }
      hold_locked(op, evicted);
    }
  }

  // ---- stats ----
  void sizes(size_t* pending, size_t* held) const {
    std::lock_guard<Mutex> guard(mu_);
    size_t n = 0;
    for (auto& kv : pending_by_rid_) n += kv.second.size();
    *pending = n;
    *held = held_.size();
  }

 private:
  const size_t memory_;
  mutable Mutex mu_;
  std::unordered_map<std::string, std::vector<OpPtr>> pending_by_rid_;  // guarded by mu_
  std::list<std::string> cancelled_order_;                              // guarded by mu_
  // The map points into the list so forget_cancelled() and a re-cancel unlink a rid in O(1).
  std::unordered_map<std::string, std::list<std::string>::iterator> cancelled_rids_;  // mu_
  std::deque<OpPtr> held_;                                              // guarded by mu_
};

}  // namespace kvsched::core
