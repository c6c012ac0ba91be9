// The worker's slot calls (create, cancel, remove, complete, finished, status) and progress
// marks, with the memories they keep: removed uuids, cancelled rids and held halves.
#include "scheduler.hpp"

#include <algorithm>

#include "scheduler_detail.hpp"

namespace kvsched::core {

using namespace detail;

void Scheduler::create_slot(const std::string& rid) {
  check_open(rid, nullptr);
  {
    std::unique_lock<SharedMutex> lock(slots_mu_);
    if (slots_.count(rid)) fail(ErrorCode::kSlotExists, rid, nullptr, "slot already exists");
    slots_.emplace(rid, std::make_shared<Slot>(rid));
  }
  rids_.forget_cancelled(rid);  // a new incarnation of the rid starts clean
  bump(counters_.slots_created);
}

uint64_t Scheduler::start_next_iteration() {
  check_open_worker_call();
  const uint64_t it = progress_.start_next_iteration();
  release_gated(progress_.load());
  return it;
}

void Scheduler::mark_layer_complete(uint64_t layer) {
  check_open_worker_call();
  release_gated(progress_.mark_layer_complete(layer));
}

void Scheduler::mark_iteration_complete() {
  check_open_worker_call();
  release_gated(progress_.mark_iteration_complete());
}

bool Scheduler::is_complete(const std::string& rid) const {
  check_open(rid, nullptr);
  SlotPtr slot = find_slot(rid);
  if (!slot) fail(ErrorCode::kUnknownSlot, rid, nullptr, "no slot");
  return slot->is_complete();
}

std::vector<std::string> Scheduler::take_finished() {
  check_open_worker_call();
  std::vector<SlotPtr> batch = finished_.take();
  std::vector<std::string> out;
  out.reserve(batch.size());
  for (auto& slot : batch) {
    std::lock_guard<Mutex> lock(slot->mu);
    if (!slot->removed) out.push_back(slot->rid);
  }
  return out;
}

SlotSnapshot Scheduler::slot_status(const std::string& rid) const {
  check_open(rid, nullptr);
  SlotPtr slot = find_slot(rid);
  if (!slot) fail(ErrorCode::kUnknownSlot, rid, nullptr, "no slot");
  SlotSnapshot s;
  std::lock_guard<Mutex> lock(slot->mu);
  // order: relaxed — read under slot->mu; the counters are a snapshot. (is_complete() is the
  // exact test; the acquire on `open` orders the counters for it.)
  s.expected = slot->expected.load(std::memory_order_relaxed);
  s.completed = slot->completed.load(std::memory_order_relaxed);
  s.failed = slot->failed.load(std::memory_order_relaxed);
  s.cancelled = slot->cancelled_ops.load(std::memory_order_relaxed);
  s.errors = slot->errors;
  return s;
}

void Scheduler::cancel_slot(const std::string& rid) {
  check_open(rid, nullptr);
  std::vector<OpPtr> victims;
  {
    auto lock = rids_.lock();
    rids_.remember_cancelled_locked(rid);
    victims = rids_.take_pending_locked(rid);
  }
  const size_t pending_victims = victims.size();
  if (SlotPtr slot = find_slot(rid)) {
    std::lock_guard<Mutex> lock(slot->mu);
    slot->cancelled = true;
    for (auto& op : slot->ops)
      if (op->mode == Mode::kScheduled && op->load_decision() == Decision::kNone)
        victims.push_back(op);
  }
  // Decide outside every lock: decide() may end the op and count it into its slot.
  for (auto& op : victims)
    if (op->mode == Mode::kScheduled) decide(op, Decision::kCancel);
  // The waiting transfer halves without a worker half are held (bounded), not kept for ever.
  std::vector<OpPtr> lone;
  for (size_t i = 0; i < pending_victims; ++i) {
    // order: acquire — pairs with the publish fetch_ors (a joined op belongs to a slot).
    if ((victims[i]->halves.load(std::memory_order_acquire) & Op::kWorkerPublished) == 0)
      lone.push_back(victims[i]);
  }
  if (!lone.empty()) hold_decided_halves(lone);
}

void Scheduler::remove_slot(const std::string& rid) {
  check_open(rid, nullptr);
  std::vector<OpPtr> ops;
  {
    std::unique_lock<SharedMutex> table_lock(slots_mu_);
    auto it = slots_.find(rid);
    if (it == slots_.end()) fail(ErrorCode::kUnknownSlot, rid, nullptr, "no slot");
    SlotPtr slot = it->second;
    std::lock_guard<Mutex> slot_lock(slot->mu);
    if (!slot->is_complete()) {
      const Uuid* first_open = nullptr;
      for (auto& op : slot->ops) {
        // order: acquire — pairs with end_op()'s acq_rel fetch_or on `counted`.
        if ((op->counted.load(std::memory_order_acquire) & Op::kEnded) == 0) {
          first_open = &op->uuid;
          break;
        }
      }
      // order: relaxed — message only.
      fail(ErrorCode::kSlotBusy, rid, first_open,
           std::to_string(slot->open.load(std::memory_order_relaxed)) +
               " operation(s) not ended; the slot can be removed once is_complete() is true");
    }
    slot->removed = true;
    ops.swap(slot->ops);  // also breaks the Slot -> Op -> Slot cycle
    slots_.erase(it);
  }
  bump(counters_.slots_removed);
  remember_removed(ops);
  rids_.prune_pending(rid);  // joined and decided halves go; waiting ones may be the next slot's
}

bool Scheduler::is_removed_uuid(const Uuid& uuid) {
  std::lock_guard<Mutex> lock(removed_mu_);
  return removed_.contains(uuid);
}

void Scheduler::remember_removed(const std::vector<OpPtr>& ops) {
  // First remember, then leave the join table. A half looking the uuid up in between still
  // finds the ended op and gets what the removed-uuid memory would give it (a duplicate for the
  // worker side, CANCEL for a transfer half that never came): at no moment is the uuid missing
  // from both places.
  size_t forgotten = 0;
  {
    std::lock_guard<Mutex> lock(removed_mu_);
    for (auto& op : ops) forgotten += removed_.add(op->uuid);
  }
  // order: relaxed — statistic only.
  if (forgotten) counters_.removed_forgotten.fetch_add(forgotten, std::memory_order_relaxed);
  for (auto& op : ops) table_.erase(op);
}

void Scheduler::hold_decided_halves(const std::vector<OpPtr>& ops) {
  // They stay in the join table so that a late worker half joins and counts them, but only up to
  // the held bound; no longer in the pending list, which would keep them for ever when the
  // request never gets a slot.
  std::vector<OpPtr> evicted;
  rids_.hold_decided(ops, &evicted);
  if (!evicted.empty()) forget_held_cancels(std::move(evicted));
}

void Scheduler::forget_held_cancels(std::vector<OpPtr> evicted) {
  // Takes shard locks, so it runs with no lock held (the lock order is shard -> rid registry, and
  // the caller found these under the registry's lock). A held cancel whose worker half has
  // joined meanwhile belongs to a slot now and leaves the table with that slot.
  for (auto& op : evicted)
    if (table_.erase_unjoined(op)) bump(counters_.held_forgotten);
}

SlotPtr Scheduler::find_slot(const std::string& rid) const {
  std::shared_lock<SharedMutex> lock(slots_mu_);
  auto it = slots_.find(rid);
  return it == slots_.end() ? nullptr : it->second;
}

}  // namespace kvsched::core
