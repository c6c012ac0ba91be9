// The life of one operation: its two halves join (enqueue, schedule, batches of either), its
// requirement gates it, a token admits it, it is decided once (EXECUTE or CANCEL), it ends once
// (a mark, a drop, a cancel) and is counted into its slot. The "Note [...]" references point to
// docs/design.md. How decisions reach the caller and how it ends an op (waits, poll, delivery,
// marks, drops, the copy claim) is in scheduler_delivery.cpp; the slot-side calls in
// scheduler_slots.cpp; construction, close, deadlines and statistics in scheduler_admin.cpp.
#include "scheduler.hpp"

#include <algorithm>

#include "scheduler_detail.hpp"

namespace kvsched::core {

using namespace detail;

OpPtr Scheduler::enqueue_check_locked(Shard& sh, const std::string& rid, const Uuid& uuid,
                                      Mode mode) {
  auto it = sh.map.find(uuid);
  if (it != sh.map.end()) {
    const OpPtr& op = it->second;
    // order: relaxed — a worker claim on this cell is only made under this shard lock (held),
    // so this read sees every earlier worker claim.
    if (op->halves.load(std::memory_order_relaxed) & Op::kWorkerClaimed)
      fail(ErrorCode::kDuplicate, rid, &uuid,
           "worker half already enqueued (for request '" + cut_text(op->rid, kMaxQuotedBytes) +
               "')");
    check_halves_agree(*op, rid, uuid, mode, "transfer", "worker");
    return op;
  }
  if (is_removed_uuid(uuid))
    fail(ErrorCode::kDuplicate, rid, &uuid, "uuid belongs to an operation of a removed slot");
  return nullptr;
}

Scheduler::EnqueueClaim Scheduler::enqueue_claim_locked(Shard& sh, const SlotPtr& slot,
                                                        OpPtr existing, const std::string& rid,
                                                        const Uuid& uuid, Kind kind, Mode mode) {
  EnqueueClaim c;
  c.created = !existing;
  c.op = existing ? std::move(existing) : std::make_shared<Op>(uuid, rid, mode);
  const OpPtr& op = c.op;
  // order: relaxed — claims publish nothing; the fields are published by the release in the
  // kWorkerPublished fetch_or in enqueue_finish().
  op->halves.fetch_or(Op::kWorkerClaimed, std::memory_order_relaxed);
  if (c.created) sh.map.emplace(uuid, op);
  op->kind = kind;
  op->slot = slot;
  slot->ops.push_back(op);
  // order: relaxed — published to the outcome side by the kEnqueued acq_rel fetch_or in
  // enqueue_finish(), and to is_complete() readers by slot->mu / later acq_rel decrements.
  slot->expected.fetch_add(1, std::memory_order_relaxed);
  slot->open.fetch_add(1, std::memory_order_relaxed);
  return c;
}

void Scheduler::enqueue_finish(const EnqueueClaim& claim, Mode mode, bool cancel_now) {
  const OpPtr& op = claim.op;
  bump(counters_.enqueued);
  if (claim.created && mode == Mode::kScheduled && config_.op_timeout_ns > 0) {
    deadlines_.add(Clock::now() + std::chrono::nanoseconds(config_.op_timeout_ns), op);
  }
  // order: acq_rel — release publishes kind/slot written above to the transfer half's publish;
  // acquire makes the transfer half's `requirement` visible when it published first (the join).
  const uint8_t halves = op->halves.fetch_or(Op::kWorkerPublished, std::memory_order_acq_rel);
  // order: acq_rel — pairs with the kEnded fetch_or in end_op(): whichever completes the pair
  // counts the op, and sees the other side's writes (slot pointer / outcome and error).
  const uint8_t counted = op->counted.fetch_or(Op::kEnqueued, std::memory_order_acq_rel);
  if (counted & Op::kEnded) count_into_slot(op);
  if (cancel_now) {
    decide(op, Decision::kCancel);
  } else if (halves & Op::kTransferPublished) {
    on_joined(op);
  }
  // A close() that raced with this call may have scanned the shard before the op was inserted.
  // close() cancels worker-only ops of either mode; do the same for one that slipped past it.
  if (closed()) decide(op, Decision::kCancel);
}

void Scheduler::enqueue(const std::string& rid, const Uuid& uuid, Kind kind, Mode mode) {
  check_open(rid, &uuid);
  SlotPtr slot = find_slot(rid);
  if (!slot) fail(ErrorCode::kUnknownSlot, rid, &uuid, "no slot: call create_slot first");
  EnqueueClaim claim;
  bool cancel_now = false;
  {
    std::lock_guard<Mutex> slot_lock(slot->mu);
    if (slot->removed) fail(ErrorCode::kUnknownSlot, rid, &uuid, "no slot (it was removed)");
    Shard& sh = table_.shard(uuid);
    std::lock_guard<Mutex> shard_lock(sh.mu);
    OpPtr existing = enqueue_check_locked(sh, rid, uuid, mode);
    claim = enqueue_claim_locked(sh, slot, std::move(existing), rid, uuid, kind, mode);
    cancel_now = slot->cancelled && mode == Mode::kScheduled;
  }
  enqueue_finish(claim, mode, cancel_now);
}

void Scheduler::enqueue_many(const std::string& rid, const std::vector<Uuid>& uuids, Kind kind,
                             Mode mode) {
  check_open(rid, uuids.empty() ? nullptr : &uuids[0]);
  if (uuids.empty()) return;
  check_distinct(rid, uuids);
  SlotPtr slot = find_slot(rid);
  if (!slot) fail(ErrorCode::kUnknownSlot, rid, &uuids[0], "no slot: call create_slot first");
  std::vector<EnqueueClaim> claims;
  claims.reserve(uuids.size());
  bool cancel_now = false;
  {
    std::lock_guard<Mutex> slot_lock(slot->mu);
    if (slot->removed) fail(ErrorCode::kUnknownSlot, rid, &uuids[0], "no slot (it was removed)");
    const std::vector<Shard*> order = table_.lock_order(uuids);
    std::vector<std::unique_lock<Mutex>> shard_locks;
    shard_locks.reserve(order.size());
    for (Shard* sh : order) shard_locks.emplace_back(sh->mu);
    // Every element is checked before any is applied: a refusal changes nothing (S8). The
    // check leaves each element's existing op (or none) in its claim; the apply fills the rest.
    for (const Uuid& u : uuids) claims.push_back({enqueue_check_locked(table_.shard(u), rid, u, mode)});
    for (size_t i = 0; i < uuids.size(); ++i)
      claims[i] = enqueue_claim_locked(table_.shard(uuids[i]), slot, std::move(claims[i].op), rid,
                                       uuids[i], kind, mode);
    cancel_now = slot->cancelled && mode == Mode::kScheduled;
  }
  for (auto& c : claims) enqueue_finish(c, mode, cancel_now);
}

OpPtr Scheduler::standalone_cancel(const std::string& rid, const Uuid& uuid, Mode mode) {
  auto op = std::make_shared<Op>(uuid, rid, mode);
  // order: relaxed — the op is not shared yet; the poll queue's lock publishes it.
  op->halves.store(Op::kTransferClaimed | Op::kTransferPublished, std::memory_order_relaxed);
  op->decision.store(static_cast<uint8_t>(Decision::kCancel), std::memory_order_relaxed);
  op->outcome.store(static_cast<uint8_t>(Outcome::kCancelled), std::memory_order_relaxed);
  bump(counters_.late_cancelled);
  push_poll(op);
  return op;
}

OpPtr Scheduler::schedule_check_locked(Shard& sh, const std::string& rid, const Uuid& uuid,
                                       Mode mode, bool* late) {
  *late = false;
  auto it = sh.map.find(uuid);
  if (it != sh.map.end()) {
    const OpPtr& op = it->second;
    // order: relaxed — transfer claims are only made under this shard lock (held).
    if (op->halves.load(std::memory_order_relaxed) & Op::kTransferClaimed)
      fail(ErrorCode::kDuplicate, rid, &uuid,
           "transfer half already scheduled (for request '" +
               cut_text(op->rid, kMaxQuotedBytes) + "')");
    check_halves_agree(*op, rid, uuid, mode, "worker", "transfer");
    return op;
  }
  if (is_removed_uuid(uuid)) {
    if (mode == Mode::kImmediate)
      fail(ErrorCode::kDuplicate, rid, &uuid,
           "IMMEDIATE transfer half for an operation of a removed slot");
    *late = true;  // S6: a late half of a removed slot is decided CANCEL at once
  }
  return nullptr;
}

Scheduler::ScheduleClaim Scheduler::schedule_claim_locked(Shard& sh, OpPtr existing, bool late,
                                                          const std::string& rid,
                                                          const Uuid& uuid, Mode mode,
                                                          std::vector<OpPtr>* evicted_held) {
  ScheduleClaim c;
  if (existing) {
    // order: relaxed — claims publish nothing; the fields are published by the release in
    // the kTransferPublished fetch_or in schedule_finish().
    existing->halves.fetch_or(Op::kTransferClaimed, std::memory_order_relaxed);
    c.op = std::move(existing);
    return c;
  }
  if (late) {
    c.late = true;
    return c;
  }
  // The rid registry's lock is held (caller) under the shard lock: "is the rid cancelled?" and "register as
  // pending" must be one step against cancel_slot(), or a half could slip between its two steps.
  auto op = std::make_shared<Op>(uuid, rid, mode);
  // order: relaxed (all stores here) — the op is published by the shard lock.
  op->halves.store(Op::kTransferClaimed, std::memory_order_relaxed);
  c.held_cancel = mode == Mode::kScheduled && rids_.is_cancelled_locked(rid);
  if (c.held_cancel) {
    // S6: decided CANCEL at once, and held in the join table (decided and ended before it is
    // shared) so that a worker half of a later slot of this rid joins it and counts it
    // cancelled instead of waiting for a transfer half that already came.
    op->decision.store(static_cast<uint8_t>(Decision::kCancel), std::memory_order_relaxed);
    op->outcome.store(static_cast<uint8_t>(Outcome::kCancelled), std::memory_order_relaxed);
    op->counted.store(Op::kEnded, std::memory_order_relaxed);
  }
  // The table first: if a bookkeeping push below throws (bad_alloc), the entry is taken out
  // again and the element leaves the scheduler as it was (S8).
  auto [entry, inserted] = sh.map.emplace(uuid, op);
  (void)inserted;  // the check under this lock found no entry
  try {
    if (c.held_cancel) {
      rids_.hold_locked(op, evicted_held);
    } else if (mode == Mode::kScheduled) {
      rids_.add_pending_locked(rid, op);
    }
  } catch (...) {
    sh.map.erase(entry);
    throw;
  }
  c.op = std::move(op);
  c.created = true;
  return c;
}

OpPtr Scheduler::schedule_finish(ScheduleClaim& claim, const std::string& rid, const Uuid& uuid,
                                 uint64_t requirement, Mode mode) {
  if (claim.late) return standalone_cancel(rid, uuid, mode);
  OpPtr& op = claim.op;
  bump(counters_.scheduled);
  if (claim.held_cancel) {
    bump(counters_.late_cancelled);
    bump(counters_.cancelled);
  }
  op->requirement = requirement;
  if (mode == Mode::kImmediate) {
    bump(counters_.immediate);
    // order: relaxed — delivery is claimed by the creator; readers use exchange/acquire.
    op->delivered.store(true, std::memory_order_relaxed);
    decide(op, Decision::kExecute);
  } else if (claim.created && !claim.held_cancel && config_.op_timeout_ns > 0) {
    deadlines_.add(Clock::now() + std::chrono::nanoseconds(config_.op_timeout_ns), op);
  }
  // order: seq_cst — acq_rel: release publishes `requirement` to the worker half; acquire makes
  // the worker half's kind/slot visible when it published first (then this thread performs the
  // join). seq_cst: Note [poll handshake] with decide().
  const uint8_t halves = op->halves.fetch_or(Op::kTransferPublished, std::memory_order_seq_cst);
  if (halves & Op::kWorkerPublished) on_joined(op);
  // Decided before this half was published (cancelled or timed out alone): hand it to poll().
  // order: seq_cst — Note [poll handshake].
  if (mode == Mode::kScheduled &&
      op->decision.load(std::memory_order_seq_cst) != static_cast<uint8_t>(Decision::kNone) &&
      !op->delivered.load(std::memory_order_acquire))
    push_poll(op);
  // A close() that raced with this call may have scanned the shard before the op was inserted.
  if (closed()) decide(op, Decision::kCancel);
  return op;
}

OpPtr Scheduler::schedule(const std::string& rid, const Uuid& uuid, uint64_t requirement,
                          Mode mode) {
  check_open(rid, &uuid);
  ScheduleClaim claim;
  std::vector<OpPtr> evicted_held;
  {
    Shard& sh = table_.shard(uuid);
    std::lock_guard<Mutex> shard_lock(sh.mu);
    bool late = false;
    OpPtr existing = schedule_check_locked(sh, rid, uuid, mode, &late);
    if (existing || late) {
      claim = schedule_claim_locked(sh, std::move(existing), late, rid, uuid, mode, &evicted_held);
    } else {
      auto rid_lock = rids_.lock();
      claim = schedule_claim_locked(sh, nullptr, false, rid, uuid, mode, &evicted_held);
    }
  }
  if (!evicted_held.empty()) forget_held_cancels(std::move(evicted_held));
  return schedule_finish(claim, rid, uuid, requirement, mode);
}

std::vector<OpPtr> Scheduler::schedule_many(const std::string& rid,
                                            const std::vector<Uuid>& uuids,
                                            uint64_t requirement, Mode mode) {
  check_open(rid, uuids.empty() ? nullptr : &uuids[0]);
  std::vector<OpPtr> out;
  if (uuids.empty()) return out;
  check_distinct(rid, uuids);
  std::vector<ScheduleClaim> claims;
  claims.reserve(uuids.size());
  out.reserve(uuids.size());
  std::vector<OpPtr> evicted_held;
  {
    const std::vector<Shard*> order = table_.lock_order(uuids);
    std::vector<std::unique_lock<Mutex>> shard_locks;
    shard_locks.reserve(order.size());
    for (Shard* sh : order) shard_locks.emplace_back(sh->mu);
    // Every element is checked before any is applied: a refusal changes nothing (S8). The
    // check leaves each element's existing op and lateness in its claim; the apply fills the rest.
    for (const Uuid& u : uuids) {
      ScheduleClaim c;
      c.op = schedule_check_locked(table_.shard(u), rid, u, mode, &c.late);
      claims.push_back(std::move(c));
    }
    auto rid_lock = rids_.lock();  // lock order: shards -> rid registry
    for (size_t i = 0; i < uuids.size(); ++i)
      claims[i] = schedule_claim_locked(table_.shard(uuids[i]), std::move(claims[i].op), claims[i].late,
                                        rid, uuids[i], mode, &evicted_held);
  }
  if (!evicted_held.empty()) forget_held_cancels(std::move(evicted_held));
  for (size_t i = 0; i < uuids.size(); ++i)
    out.push_back(schedule_finish(claims[i], rid, uuids[i], requirement, mode));
  return out;
}

void Scheduler::on_joined(const OpPtr& op) {
  bump(counters_.joined);
  if (op->mode == Mode::kImmediate) return;  // already executing; counted through `counted`
  if (op->load_decision() != Decision::kNone) return;  // cancelled or timed out before the join
  // Fast path: no requirement, or one that already holds (progress only grows), skips the gate
  // lock; otherwise the gate re-checks under its lock (Gate::add_unless_ready).
  if (progress_.holds(op->requirement) || !gate_.add_unless_ready(op, progress_)) make_ready(op);
}

void Scheduler::release_gated(uint64_t position) {
  const int64_t t = now_ns();
  for (auto& op : gate_.release_upto(position)) {
    if (op->load_decision() != Decision::kNone) continue;
    op->released_at_ns = t;
    make_ready(op);
  }
}

void Scheduler::make_ready(const OpPtr& op) {
  // order: relaxed — op_timeout exemption is advisory (docs/semantics.md: a deadline that fires
  // before the op became ready still cancels it).
  op->waiting_token.store(true, std::memory_order_relaxed);
  // Fast path: nothing queued ahead of us and a token is free. See Note [token handshake].
  if (ready_.queued() == 0 && tokens_.try_acquire()) {
    note_inflight();
    if (!decide(op, Decision::kExecute)) release_token();
    return;
  }
  op->ready_ns = now_ns();
  // order: relaxed — a unique ticket; its order only matters under ready_mu_.
  op->ready_seq = ready_seq_.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard<Mutex> lock(ready_mu_);
    ready_.push(op);
  }
  pump();
}

void Scheduler::pump() {
  std::vector<OpPtr> granted;
  {
    std::lock_guard<Mutex> lock(ready_mu_);
    const int64_t t = now_ns();
    while (!ready_.empty()) {
      if (!tokens_.try_acquire()) break;
      OpPtr op = ready_.pop(t);
      if (op->load_decision() != Decision::kNone) {
        tokens_.release();  // cancelled while queued; the loop itself reuses the token
        continue;
      }
      granted.push_back(std::move(op));
    }
  }
  if (!granted.empty()) note_inflight();
  for (auto& op : granted)
    if (!decide(op, Decision::kExecute)) release_token();
}

void Scheduler::release_token() {
  tokens_.release();
  if (ready_.queued() > 0) pump();  // Note [token handshake]
}

bool Scheduler::decide(const OpPtr& op, Decision d, std::string error, bool timed_out) {
  uint8_t expected = static_cast<uint8_t>(Decision::kNone);
  // order: seq_cst — acq_rel publishes the op's fields to load_decision() readers; seq_cst
  // additionally orders it before the waiters load in notify_waiters() (Note [waiter handshake]).
  if (!op->decision.compare_exchange_strong(expected, static_cast<uint8_t>(d),
                                            std::memory_order_seq_cst))
    return false;
  // Counted before the waiters and the slot learn the outcome, so whoever sees a timed-out op
  // ended also sees it counted in stats() (a waiter woken first could read timed_out == 0).
  if (timed_out) bump(counters_.timed_out);
  if (d == Decision::kExecute) {
    bump(counters_.executed);
    if (op->released_at_ns != 0) dispatch_latency_.record(now_ns() - op->released_at_ns);
  } else {
    // Only a joined op can be parked in the gate, and only after the join is `requirement`
    // visible: a worker half cancelled alone (cancelled slot) races the transfer half's write of
    // it (found by ThreadSanitizer in the seeded stress test).
    // order: acquire — pairs with the publish fetch_ors; seeing kTransferPublished makes the
    // transfer half's `requirement` visible.
    const uint8_t halves = op->halves.load(std::memory_order_acquire);
    if ((halves & Op::kBothPublished) == Op::kBothPublished && op->requirement != 0 &&
        !progress_.holds(op->requirement))
      gate_.erase(op);
    end_op(op, Outcome::kCancelled, std::move(error));
  }
  waiters_.notify(*op);
  notify_watcher(*op);
  // Only ops whose transfer half exists go to poll(): a worker half decided alone (cancelled or
  // timed out before its transfer half came) has no handle yet; schedule() pushes it when the
  // transfer half arrives. See Note [poll handshake] for why one of the two always pushes.
  // order: seq_cst — Note [poll handshake].
  if (op->mode == Mode::kScheduled &&
      (op->halves.load(std::memory_order_seq_cst) & Op::kTransferPublished) &&
      // order: acquire — pairs with the exchange in deliver()/PollQueue::pop().
      !op->delivered.load(std::memory_order_acquire)) {
    push_poll(op);
  }
  return true;
}

bool Scheduler::end_op(const OpPtr& op, Outcome outcome, std::string error) {
  uint8_t expected = static_cast<uint8_t>(Outcome::kOpen);
  // order: acq_rel — the single exactly-once transition (S4); release publishes nothing yet
  // (error is written after winning and published by the `counted` fetch_or below).
  if (!op->outcome.compare_exchange_strong(expected, static_cast<uint8_t>(outcome),
                                           std::memory_order_acq_rel, std::memory_order_acquire))
    return false;
  op->error = std::move(error);
  switch (outcome) {
    case Outcome::kCompleted: bump(counters_.completed); break;
    case Outcome::kFailed: bump(counters_.failed); break;
    case Outcome::kCancelled: bump(counters_.cancelled); break;
    case Outcome::kOpen: break;
  }
  if (op->mode == Mode::kScheduled && op->load_decision() == Decision::kExecute) release_token();
  // order: acq_rel — release publishes outcome and error to the enqueuer; acquire sees the slot
  // pointer when the worker half was enqueued first. Pairs with the fetch_or in enqueue().
  const uint8_t counted = op->counted.fetch_or(Op::kEnded, std::memory_order_acq_rel);
  if (counted & Op::kEnqueued) count_into_slot(op);
  return true;
}

void Scheduler::count_into_slot(const OpPtr& op) {
  Slot& slot = *op->slot;
  const Outcome o = op->load_outcome();
  // order: relaxed — published to readers by the acq_rel fetch_sub on `open` below.
  switch (o) {
    case Outcome::kCompleted: slot.completed.fetch_add(1, std::memory_order_relaxed); break;
    case Outcome::kFailed: slot.failed.fetch_add(1, std::memory_order_relaxed); break;
    case Outcome::kCancelled: slot.cancelled_ops.fetch_add(1, std::memory_order_relaxed); break;
    case Outcome::kOpen: break;
  }
  if (o == Outcome::kFailed || (o == Outcome::kCancelled && !op->error.empty())) {
    std::lock_guard<Mutex> lock(slot.mu);
    slot.errors.emplace_back(op->uuid, op->error);
  }
  // order: acq_rel — release publishes the counters and errors above to is_complete()'s acquire;
  // acquire chains the earlier decrements so the thread that reaches zero saw them all.
  if (slot.open.fetch_sub(1, std::memory_order_acq_rel) == 1) finished_.push(op->slot);
}

}  // namespace kvsched::core
