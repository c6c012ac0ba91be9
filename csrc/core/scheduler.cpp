// Implementation of the scheduler. The "Note [...]" references point to docs/design.md.
#include "scheduler.hpp"

#include <unistd.h>

#include <algorithm>

namespace kvsched::core {
namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

std::string who(const std::string& rid, const Uuid* uuid) {
  std::string s = "request '" + cut_text(rid, kMaxQuotedBytes) + "'";
  if (uuid) s += " op " + uuid->str();
  return s;
}

[[noreturn]] void fail(ErrorCode code, const std::string& rid, const Uuid* uuid,
                       const std::string& what) {
  throw Error(code, who(rid, uuid) + ": " + what);
}

const char* mode_name(Mode m) { return m == Mode::kScheduled ? "SCHEDULED" : "IMMEDIATE"; }

// S1: the second half of an operation must name the request id and mode its first half named.
// `first` and `second` name the sides ("worker", "transfer") for the message.
void check_halves_agree(const Op& op, const std::string& rid, const Uuid& uuid, Mode mode,
                        const char* first, const char* second) {
  if (op.rid != rid)
    fail(ErrorCode::kProtocol, rid, &uuid,
         std::string("halves disagree on the request id (") + first + " half says '" + op.rid +
             "')");
  if (op.mode != mode)
    fail(ErrorCode::kProtocol, rid, &uuid,
         std::string("halves disagree on the mode (") + first + " half is " + mode_name(op.mode) +
             ", " + second + " half " + mode_name(mode) + ")");
}

void bump(Atomic<uint64_t>& c) {
  // order: relaxed — statistic only; never read to make a decision.
  c.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

Scheduler::Scheduler(const Config& config)
    : config_(config),
      progress_(config.num_layers),
      tokens_(config.max_inflight),
      ready_(config.store_starvation_ns),
      poll_queue_(config.poll_backlog),
      shards_(std::max<size_t>(1, config.join_shards)),
      stripes_(64),
      removed_(config.removed_memory) {
  if (config.max_inflight < 1) throw Error(ErrorCode::kInvalidArgument, "max_inflight must be >= 1");
  if ((shards_.size() & (shards_.size() - 1)) != 0)
    throw Error(ErrorCode::kInvalidArgument, "join_shards must be a power of two");
  for (auto& sh : shards_) sh.map.reserve(64);
  if (config_.op_timeout_ns > 0) deadline_thread_ = std::thread([this] { deadline_loop(); });
}

Scheduler::~Scheduler() {
  close();
  // Break the Slot -> Op -> Slot reference cycles of slots that were never removed.
  std::unique_lock<SharedMutex> lock(slots_mu_);
  for (auto& kv : slots_) {
    std::lock_guard<Mutex> slot_lock(kv.second->mu);
    kv.second->ops.clear();
  }
  slots_.clear();
}

// ------------------------------------------------------------------------------------------------
// helpers

void Scheduler::check_not_inherited() const {
  if (inherited())
    throw Error(ErrorCode::kForked,
                "this scheduler was created in process " + std::to_string(creator_pid_) +
                    " and inherited by fork() into process " +
                    std::to_string(static_cast<long>(getpid())) +
                    "; a forked child cannot use it (its threads and locks stay in the parent). "
                    "Create a new Scheduler in the child");
}

void Scheduler::check_open(const std::string& rid, const Uuid* uuid) const {
  check_not_inherited();
  // order: acquire — pairs with the exchange in close(); see the re-check in schedule().
  if (closed_.load(std::memory_order_acquire))
    fail(ErrorCode::kClosed, rid, uuid, "the scheduler is closed");
}

void Scheduler::check_open_worker_call() const {
  check_not_inherited();
  // order: acquire — as check_open().
  if (closed_.load(std::memory_order_acquire))
    throw Error(ErrorCode::kClosed, "the scheduler is closed");
}

void Scheduler::check_distinct(const std::string& rid, const std::vector<Uuid>& uuids) {
  if (uuids.size() < 2) return;
  if (uuids.size() <= 16) {  // engines batch a few ops per request: compare pairs, no copy
    for (size_t i = 1; i < uuids.size(); ++i)
      for (size_t j = 0; j < i; ++j)
        if (uuids[i] == uuids[j])
          fail(ErrorCode::kDuplicate, rid, &uuids[i],
               "the uuid appears twice in one batch; nothing applied");
    return;
  }
  std::vector<Uuid> sorted(uuids);
  auto less = [](const Uuid& a, const Uuid& b) { return a.hi != b.hi ? a.hi < b.hi : a.lo < b.lo; };
  std::sort(sorted.begin(), sorted.end(), less);
  auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup != sorted.end())
    fail(ErrorCode::kDuplicate, rid, &*dup, "the uuid appears twice in one batch; nothing applied");
}

std::vector<Scheduler::Shard*> Scheduler::lock_order(const std::vector<Uuid>& uuids) {
  // Several shard locks are taken in address order (the shards live in one vector, so that is
  // index order): two batch calls can never wait for each other in a cycle.
  std::vector<Shard*> order;
  order.reserve(uuids.size());
  for (const Uuid& u : uuids) order.push_back(&shard(u));
  std::sort(order.begin(), order.end());
  order.erase(std::unique(order.begin(), order.end()), order.end());
  return order;
}

void Scheduler::hold_locked(const OpPtr& op, std::vector<OpPtr>* evicted) {
  held_cancels_.push_back(op);
  while (held_cancels_.size() > std::max<size_t>(1, config_.removed_memory)) {
    evicted->push_back(std::move(held_cancels_.front()));
    held_cancels_.pop_front();
  }
}

void Scheduler::hold_decided_halves(const std::vector<OpPtr>& ops) {
  // Transfer halves decided CANCEL while no worker half had come (their rid was cancelled, or
  // they timed out): they stay in the join table so that a late worker half joins and counts
  // them, but only up to the held bound; no longer in pending_by_rid_, which would keep them for
  // ever when the request never gets a slot.
  std::vector<OpPtr> evicted;
  {
    std::lock_guard<Mutex> lock(rid_mu_);
    for (auto& op : ops) {
      auto it = pending_by_rid_.find(op->rid);
      if (it != pending_by_rid_.end()) {
        auto& v = it->second;
        v.erase(std::remove(v.begin(), v.end(), op), v.end());
        if (v.empty()) pending_by_rid_.erase(it);
      }
      hold_locked(op, &evicted);
    }
  }
  if (!evicted.empty()) forget_held_cancels(std::move(evicted));
}

bool Scheduler::closed() const {
  // order: acquire — pairs with the exchange in close().
  return closed_.load(std::memory_order_acquire);
}

SlotPtr Scheduler::find_slot(const std::string& rid) const {
  std::shared_lock<SharedMutex> lock(slots_mu_);
  auto it = slots_.find(rid);
  return it == slots_.end() ? nullptr : it->second;
}

bool Scheduler::rid_cancelled_locked(const std::string& rid) const {
  return !cancelled_rids_.empty() && cancelled_rids_.count(rid) != 0;
}

void Scheduler::remember_cancelled_rid_locked(const std::string& rid) {
  auto it = cancelled_rids_.find(rid);
  if (it != cancelled_rids_.end()) {
    // Cancelled again: it becomes the most recent (splice keeps the map's iterator valid).
    cancelled_order_.splice(cancelled_order_.end(), cancelled_order_, it->second);
    return;
  }
  cancelled_order_.push_back(rid);
  cancelled_rids_.emplace(rid, std::prev(cancelled_order_.end()));
  while (cancelled_order_.size() > std::max<size_t>(1, config_.removed_memory)) {
    cancelled_rids_.erase(cancelled_order_.front());
    cancelled_order_.pop_front();
  }
}

void Scheduler::forget_held_cancels(std::vector<OpPtr> evicted) {
  // Takes shard locks, so it runs with no lock held (the lock order is shard -> rid_mu_, and the
  // caller found these under rid_mu_). A held cancel whose worker half has joined meanwhile
  // belongs to a slot now and leaves the table with that slot.
  for (auto& op : evicted) {
    Shard& sh = shard(op->uuid);
    std::lock_guard<Mutex> lock(sh.mu);
    auto it = sh.map.find(op->uuid);
    // order: relaxed — worker claims are made only under this shard lock (held).
    if (it != sh.map.end() && it->second == op &&
        (op->halves.load(std::memory_order_relaxed) & Op::kWorkerClaimed) == 0) {
      sh.map.erase(it);
      bump(counters_.held_forgotten);
    }
  }
}

void Scheduler::note_inflight() {
  const uint64_t now = static_cast<uint64_t>(tokens_.in_use());
  // order: relaxed — statistic only (a high-water mark checked by tests against max_inflight).
  uint64_t peak = counters_.peak_inflight.load(std::memory_order_relaxed);
  while (now > peak && !counters_.peak_inflight.compare_exchange_weak(
                           peak, now, std::memory_order_relaxed, std::memory_order_relaxed)) {
  }
}

// ------------------------------------------------------------------------------------------------
// worker side

void Scheduler::create_slot(const std::string& rid) {
  check_open(rid, nullptr);
  {
    std::unique_lock<SharedMutex> lock(slots_mu_);
    if (slots_.count(rid)) fail(ErrorCode::kSlotExists, rid, nullptr, "slot already exists");
    slots_.emplace(rid, std::make_shared<Slot>(rid));
  }
  {
    // A new incarnation of the rid starts clean: it is no longer cancelled. (Its held cancels
    // stay: worker halves of this slot may still join them.)
    std::lock_guard<Mutex> lock(rid_mu_);
    auto it = cancelled_rids_.find(rid);
    if (it != cancelled_rids_.end()) {
      cancelled_order_.erase(it->second);
      cancelled_rids_.erase(it);
    }
  }
  bump(counters_.slots_created);
}

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
    std::lock_guard<Mutex> lock(deadline_mu_);
    deadlines_.emplace_back(Clock::now() + std::chrono::nanoseconds(config_.op_timeout_ns), op);
    deadline_cv_.notify_one();
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
    Shard& sh = shard(uuid);
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
    const std::vector<Shard*> order = lock_order(uuids);
    std::vector<std::unique_lock<Mutex>> shard_locks;
    shard_locks.reserve(order.size());
    for (Shard* sh : order) shard_locks.emplace_back(sh->mu);
    // Every element is checked before any is applied: a refusal changes nothing (S8). The
    // check leaves each element's existing op (or none) in its claim; the apply fills the rest.
    for (const Uuid& u : uuids) claims.push_back({enqueue_check_locked(shard(u), rid, u, mode)});
    for (size_t i = 0; i < uuids.size(); ++i)
      claims[i] = enqueue_claim_locked(shard(uuids[i]), slot, std::move(claims[i].op), rid,
                                       uuids[i], kind, mode);
    cancel_now = slot->cancelled && mode == Mode::kScheduled;
  }
  for (auto& c : claims) enqueue_finish(c, mode, cancel_now);
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
  std::vector<SlotPtr> batch;
  {
    std::lock_guard<Mutex> lock(finished_mu_);
    batch.swap(finished_);
  }
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
  const bool complete = slot->is_complete();
  s.expected = slot->expected.load(std::memory_order_relaxed);
  s.completed = slot->completed.load(std::memory_order_relaxed);
  s.failed = slot->failed.load(std::memory_order_relaxed);
  s.cancelled = slot->cancelled_ops.load(std::memory_order_relaxed);
  (void)complete;
  s.errors = slot->errors;
  return s;
}

void Scheduler::cancel_slot(const std::string& rid) {
  check_open(rid, nullptr);
  std::vector<OpPtr> victims;
  {
    std::lock_guard<Mutex> lock(rid_mu_);
    remember_cancelled_rid_locked(rid);
    auto it = pending_by_rid_.find(rid);
    if (it != pending_by_rid_.end()) {
      victims = std::move(it->second);
      pending_by_rid_.erase(it);
    }
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
  {
    // Forget transfer halves of this rid that joined or ended; keep waiting ones (they may
    // belong to the next slot of the same rid, docs/semantics.md).
    std::lock_guard<Mutex> lock(rid_mu_);
    auto it = pending_by_rid_.find(rid);
    if (it != pending_by_rid_.end()) {
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
  }
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
  for (auto& op : ops) {
    Shard& sh = shard(op->uuid);
    std::lock_guard<Mutex> lock(sh.mu);
    auto it = sh.map.find(op->uuid);
    if (it != sh.map.end() && it->second == op) sh.map.erase(it);
  }
}

// ------------------------------------------------------------------------------------------------
// transfer side

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
  // rid_mu_ is held (caller) under the shard lock: "is the rid cancelled?" and "register as
  // pending" must be one step against cancel_slot(), or a half could slip between its two steps.
  auto op = std::make_shared<Op>(uuid, rid, mode);
  // order: relaxed (all stores here) — the op is published by the shard lock.
  op->halves.store(Op::kTransferClaimed, std::memory_order_relaxed);
  c.held_cancel = mode == Mode::kScheduled && rid_cancelled_locked(rid);
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
      hold_locked(op, evicted_held);
    } else if (mode == Mode::kScheduled) {
      pending_by_rid_[rid].push_back(op);
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
    std::lock_guard<Mutex> lock(deadline_mu_);
    deadlines_.emplace_back(Clock::now() + std::chrono::nanoseconds(config_.op_timeout_ns), op);
    deadline_cv_.notify_one();
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
    Shard& sh = shard(uuid);
    std::lock_guard<Mutex> shard_lock(sh.mu);
    bool late = false;
    OpPtr existing = schedule_check_locked(sh, rid, uuid, mode, &late);
    if (existing || late) {
      claim = schedule_claim_locked(sh, std::move(existing), late, rid, uuid, mode, &evicted_held);
    } else {
      std::lock_guard<Mutex> rid_lock(rid_mu_);
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
    const std::vector<Shard*> order = lock_order(uuids);
    std::vector<std::unique_lock<Mutex>> shard_locks;
    shard_locks.reserve(order.size());
    for (Shard* sh : order) shard_locks.emplace_back(sh->mu);
    // Every element is checked before any is applied: a refusal changes nothing (S8). The
    // check leaves each element's existing op and lateness in its claim; the apply fills the rest.
    for (const Uuid& u : uuids) {
      ScheduleClaim c;
      c.op = schedule_check_locked(shard(u), rid, u, mode, &c.late);
      claims.push_back(std::move(c));
    }
    std::lock_guard<Mutex> rid_lock(rid_mu_);  // lock order: shards -> rid_mu_
    for (size_t i = 0; i < uuids.size(); ++i)
      claims[i] = schedule_claim_locked(shard(uuids[i]), std::move(claims[i].op), claims[i].late,
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

bool Scheduler::decide(const OpPtr& op, Decision d, std::string error) {
  uint8_t expected = static_cast<uint8_t>(Decision::kNone);
  // order: seq_cst — acq_rel publishes the op's fields to load_decision() readers; seq_cst
  // additionally orders it before the waiters load in notify_waiters() (Note [waiter handshake]).
  if (!op->decision.compare_exchange_strong(expected, static_cast<uint8_t>(d),
                                            std::memory_order_seq_cst))
    return false;
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
  notify_waiters(*op);
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
  if (slot.open.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    std::lock_guard<Mutex> lock(finished_mu_);
    finished_.push_back(op->slot);
    // An engine that tracks completion with is_complete() and never calls take_finished() must
    // not make this queue grow for ever: past a threshold, drop the slots removed since (their
    // entries would be skipped by take_finished anyway). Amortised O(1) per push.
    if (finished_.size() >= finished_compact_at_) {
      finished_.erase(std::remove_if(finished_.begin(), finished_.end(),
                                     [](const SlotPtr& s) {
                                       std::lock_guard<Mutex> slot_lock(s->mu);
                                       return s->removed;
                                     }),
                      finished_.end());
      finished_compact_at_ = std::max<size_t>(1024, 2 * finished_.size());
    }
  }
}

Scheduler::WaitStripe& Scheduler::stripe_for(const Op* op) {
  // Ops are 16-byte aligned and std::hash of a pointer is the identity in libstdc++: mix the
  // address so all stripes are used (found by the deterministic-schedule harness).
  uint64_t x = reinterpret_cast<uintptr_t>(op) >> 4;
  x *= 0x9e3779b97f4a7c15ULL;
  return stripes_[(x >> 32) % stripes_.size()];
}

void Scheduler::notify_waiters(const Op& op) {
  // order: seq_cst — Note [waiter handshake]: after the seq_cst decision CAS, either we see the
  // waiter's increment, or the waiter's predicate check sees our decision.
  if (op.waiters.load(std::memory_order_seq_cst) == 0) return;
  WaitStripe& s = stripe_for(&op);
  { std::lock_guard<Mutex> lock(s.mu); }  // a waiter between its check and its sleep holds s.mu
  s.cv.notify_all();
}

Scheduler::WatchResult Scheduler::watch(const OpPtr& op,
                                         const std::shared_ptr<AsyncNotifier>& notifier,
                                         uint64_t token) {
  check_not_inherited();
  uint8_t none = Op::kWatchNone;
  // order: acq_rel — claims the right to write notifier/watch_token (once per op).
  if (!op->watch_state.compare_exchange_strong(none, Op::kWatchWriting, std::memory_order_acq_rel))
    return op->load_decision() != Decision::kNone ? WatchResult::kDecided : WatchResult::kBusy;
  op->notifier = notifier;
  op->watch_token = token;
  // order: seq_cst — Note [watch handshake] (docs/design.md): this store, then the decision
  // load below; decide() makes its decision CAS, then loads watch_state (notify_watcher). In the
  // single total order of seq_cst operations one of the two loads sees the other side's write:
  // either decide() posts the token, or we see the decision and report kDecided (both may
  // happen: a token can arrive twice).
  op->watch_state.store(Op::kWatchSet, std::memory_order_seq_cst);
  if (op->decision.load(std::memory_order_seq_cst) != static_cast<uint8_t>(Decision::kNone))
    return WatchResult::kDecided;
  return WatchResult::kWatching;
}

void Scheduler::notify_watcher(const Op& op) {
  // order: seq_cst — Note [watch handshake]; the acquire part also makes notifier/watch_token,
  // written before the kWatchSet store, visible here.
  if (op.watch_state.load(std::memory_order_seq_cst) != Op::kWatchSet) return;
  op.notifier->post(op.watch_token);
}

Decision Scheduler::wait_decision(const OpPtr& op, Clock::time_point deadline) {
  Decision d = op->load_decision();
  if (d != Decision::kNone || closed()) return d;
  // order: seq_cst — Note [waiter handshake].
  op->waiters.fetch_add(1, std::memory_order_seq_cst);
  WaitStripe& s = stripe_for(op.get());
  {
    std::unique_lock<Mutex> lock(s.mu);
    s.cv.wait_until(lock, deadline, [&] {
      // order: seq_cst — Note [waiter handshake].
      return op->decision.load(std::memory_order_seq_cst) !=
                 static_cast<uint8_t>(Decision::kNone) ||
             closed();
    });
  }
  // order: relaxed — only a hint for notify_waiters(); a stale non-zero costs one notify.
  op->waiters.fetch_sub(1, std::memory_order_relaxed);
  return op->load_decision();
}

std::vector<OpPtr> Scheduler::poll(size_t max_items, Clock::time_point deadline) {
  check_open_worker_call();
  std::vector<OpPtr> skipped;
  auto out = poll_queue_.pop(max_items, deadline, &skipped);
  for (auto& op : skipped) on_handle_dropped(op);
  return out;
}

bool Scheduler::deliver(const OpPtr& op) {
  if (op->load_decision() == Decision::kNone) return false;
  // order: relaxed load first (cheap common case), then acq_rel exchange to claim delivery once
  // against PollQueue::pop().
  if (op->delivered.load(std::memory_order_relaxed)) return false;
  return !op->delivered.exchange(true, std::memory_order_acq_rel);
}

void Scheduler::mark_complete(const OpPtr& op, bool ok, const std::string& error,
                              bool by_engine) {
  check_not_inherited();
  const Decision d = op->load_decision();
  if (d != Decision::kExecute)
    fail(ErrorCode::kProtocol, op->rid, &op->uuid,
         d == Decision::kNone ? "mark_complete on an undecided handle"
                              : "mark_complete on a handle decided CANCEL");
  if (!by_engine) {
    uint8_t free_marker = Op::kMarkerFree;
    // order: acq_rel — one CAS against claim_transfer(): either the engine owns the op (and we
    // refuse), or we do (and no copy can start for it any more).
    if (!op->marker.compare_exchange_strong(free_marker, Op::kMarkerCaller,
                                            std::memory_order_acq_rel) &&
        free_marker == Op::kMarkerEngine) {
      fail(ErrorCode::kProtocol, op->rid, &op->uuid,
           op->load_outcome() == Outcome::kOpen
               ? "mark_complete on a handle a TransferEngine is copying (the engine marks it when "
                 "the copy ends)"
               : "handle already marked (by its TransferEngine; second mark ignored)");
    }
  }
  // Marking shows the caller knew the decision: it counts as delivery, so poll() does not hand
  // out an operation that has ended. order: acq_rel — as the claims in deliver()/PollQueue::pop().
  op->delivered.exchange(true, std::memory_order_acq_rel);
  if (!end_op(op, ok ? Outcome::kCompleted : Outcome::kFailed,
              ok ? std::string() : cut_text(error, kMaxErrorBytes)))
    fail(ErrorCode::kProtocol, op->rid, &op->uuid, "handle already marked (second mark ignored)");
}

void Scheduler::claim_transfer(const OpPtr& op) {
  check_not_inherited();
  const Decision d = op->load_decision();
  if (d != Decision::kExecute)
    fail(ErrorCode::kProtocol, op->rid, &op->uuid,
         d == Decision::kNone ? "only an EXECUTE handle can be submitted, this one is undecided"
                              : "only an EXECUTE handle can be submitted, this one is CANCEL");
  uint8_t free_marker = Op::kMarkerFree;
  // order: acq_rel — see mark_complete(): the one CAS that orders an engine's claim against a
  // caller's mark.
  if (!op->marker.compare_exchange_strong(free_marker, Op::kMarkerEngine,
                                          std::memory_order_acq_rel)) {
    fail(ErrorCode::kProtocol, op->rid, &op->uuid,
         free_marker == Op::kMarkerEngine
             ? "already submitted to a TransferEngine (its copy runs once; nothing copied again)"
             : "the operation has been marked (it ended, its blocks may belong to another request "
               "now); nothing copied");
  }
  // A handle dropped or failed by close() before any mark (outcome no longer open) is refused too.
  if (op->load_outcome() != Outcome::kOpen) {
    release_transfer_claim(op);
    fail(ErrorCode::kProtocol, op->rid, &op->uuid,
         "the operation has ended; nothing copied");
  }
}

void Scheduler::release_transfer_claim(const OpPtr& op) {
  uint8_t engine = Op::kMarkerEngine;
  // order: acq_rel — as claim_transfer().
  op->marker.compare_exchange_strong(engine, Op::kMarkerFree, std::memory_order_acq_rel);
}

bool Scheduler::on_handle_dropped(const OpPtr& op, bool evicted_from_backlog) {
  // Delivery first, then views: see Note [handle views]. A poller increments views before it
  // claims delivery, so if we see its claim (acquire) we also see its transit view.
  // order: acquire — pairs with the delivery exchange in deliver()/PollQueue::pop().
  const bool delivered = op->delivered.load(std::memory_order_acquire);
  // Undelivered and still pollable: dropping withdraws nothing (S4); poll() will hand it out.
  // After close() nothing is pollable any more.
  if (!evicted_from_backlog && !delivered && !closed()) return false;
  // order: acquire — pairs with the release decrements of the binding layer and of poll().
  if (op->views.load(std::memory_order_acquire) != 0) return false;
  if (op->load_decision() != Decision::kExecute || op->load_outcome() != Outcome::kOpen)
    return false;
  const bool failed = end_op(op, Outcome::kFailed,
                             "HandleDroppedError: the handle of " + who(op->rid, &op->uuid) +
                                 " was garbage-collected after its EXECUTE decision without "
                                 "mark_complete(); the transfer is treated as failed");
  if (failed) bump(counters_.dropped);
  return failed;
}

bool Scheduler::release_view(const OpPtr& op) {
  // order: release — pairs with the acquire loads in on_handle_dropped().
  op->views.fetch_sub(1, std::memory_order_release);
  return on_handle_dropped(op);
}

void Scheduler::push_poll(const OpPtr& op) {
  // order: relaxed — only atomicity matters (one push per op); the queue's lock publishes the op.
  if (op->poll_queued.exchange(true, std::memory_order_relaxed)) return;
  OpPtr evicted = poll_queue_.push(op);
  if (!evicted) return;
  // order: acquire — pairs with the delivery exchange.
  if (!evicted->delivered.load(std::memory_order_acquire)) {
    bump(counters_.backlog_evicted);
    on_handle_dropped(evicted, /*evicted_from_backlog=*/true);
  }
}

// ------------------------------------------------------------------------------------------------
// deadlines, close, stats

void Scheduler::deadline_loop() {
  std::unique_lock<Mutex> lock(deadline_mu_);
  while (!deadline_stop_) {
    if (deadlines_.empty()) {
      deadline_cv_.wait(lock);
      continue;
    }
    auto [when, op] = deadlines_.front();
    if (Clock::now() < when) {
      deadline_cv_.wait_until(lock, when);
      continue;
    }
    deadlines_.pop_front();
    lock.unlock();
    // order: relaxed — advisory exemption, see make_ready().
    if (op->load_decision() == Decision::kNone &&
        !op->waiting_token.load(std::memory_order_relaxed)) {
      // order: acquire — pairs with the publish fetch_ors; reports which half is missing.
      const uint8_t h = op->halves.load(std::memory_order_acquire);
      const char* why = !(h & Op::kWorkerPublished)   ? "its worker half never arrived"
                        : !(h & Op::kTransferPublished) ? "its transfer half never arrived"
                                                        : "its requirement never held";
      const double secs = static_cast<double>(config_.op_timeout_ns) / 1e9;
      char buf[64];
      std::snprintf(buf, sizeof buf, "%g", secs);
      if (decide(op, Decision::kCancel,
                 "timed out after " + std::string(buf) + " s undecided (" + why + ")")) {
        bump(counters_.timed_out);
        // A transfer half whose worker half never came is held (bounded) for a late worker half.
        if (!(h & Op::kWorkerPublished)) hold_decided_halves({op});
      }
    }
    lock.lock();
  }
}

void Scheduler::close() {
  // order: acq_rel — publishes the closed state to check_open()/closed() readers; see the
  // re-checks after insertion in schedule()/enqueue() for why no op can slip past the scan.
  if (closed_.exchange(true, std::memory_order_acq_rel)) return;
  std::vector<OpPtr> live;
  for (auto& sh : shards_) {
    std::lock_guard<Mutex> lock(sh.mu);
    for (auto& kv : sh.map) live.push_back(kv.second);
  }
  for (auto& op : live) decide(op, Decision::kCancel);
  {
    std::lock_guard<Mutex> lock(deadline_mu_);
    deadline_stop_ = true;
    deadlines_.clear();
  }
  deadline_cv_.notify_all();
  if (deadline_thread_.joinable() && deadline_thread_.get_id() != std::this_thread::get_id())
    deadline_thread_.join();
  poll_queue_.close();
  // Nobody can poll() any more: an undelivered EXECUTE op that no handle object holds would keep
  // its token for ever. Fail those as dropped (held ones are failed when their handle goes).
  for (auto& op : poll_queue_.drain()) on_handle_dropped(op, /*evicted_from_backlog=*/true);
  for (auto& s : stripes_) {
    { std::lock_guard<Mutex> lock(s.mu); }
    s.cv.notify_all();
  }
}

std::vector<std::pair<std::string, double>> Scheduler::stats() const {
  auto get = [](const Atomic<uint64_t>& c) {
    // order: relaxed — statistics are a best-effort snapshot.
    return static_cast<double>(c.load(std::memory_order_relaxed));
  };
  size_t slots = 0, pending = 0, held = 0, removed = 0, finished = 0;
  {
    std::shared_lock<SharedMutex> lock(slots_mu_);
    slots = slots_.size();
  }
  {
    std::lock_guard<Mutex> lock(rid_mu_);
    for (auto& kv : pending_by_rid_) pending += kv.second.size();
    held = held_cancels_.size();
  }
  {
    std::lock_guard<Mutex> lock(const_cast<Mutex&>(removed_mu_));
    removed = removed_.size();
  }
  {
    std::lock_guard<Mutex> lock(const_cast<Mutex&>(finished_mu_));
    finished = finished_.size();
  }
  const uint64_t pos = progress_.load();
  return {
      {"slots", static_cast<double>(slots)},
      {"slots_created", get(counters_.slots_created)},
      {"slots_removed", get(counters_.slots_removed)},
      {"enqueued", get(counters_.enqueued)},
      {"scheduled", get(counters_.scheduled)},
      {"immediate", get(counters_.immediate)},
      {"joined", get(counters_.joined)},
      {"executed", get(counters_.executed)},
      {"completed", get(counters_.completed)},
      {"failed", get(counters_.failed)},
      {"cancelled", get(counters_.cancelled)},
      {"dropped", get(counters_.dropped)},
      {"timed_out", get(counters_.timed_out)},
      {"late_cancelled", get(counters_.late_cancelled)},
      {"removed_forgotten", get(counters_.removed_forgotten)},
      {"backlog_evicted", get(counters_.backlog_evicted)},
      {"held_forgotten", get(counters_.held_forgotten)},
      {"inflight", static_cast<double>(tokens_.in_use())},
      {"peak_inflight", get(counters_.peak_inflight)},
      {"max_inflight", static_cast<double>(tokens_.capacity())},
      {"ready_queued", static_cast<double>(ready_.queued())},
      {"gated", static_cast<double>(gate_.size())},
      {"pending_transfer_halves", static_cast<double>(pending)},
      {"held_cancels", static_cast<double>(held)},
      {"removed_memory_size", static_cast<double>(removed)},
      {"poll_backlog", static_cast<double>(poll_queue_.size())},
      {"finished_backlog", static_cast<double>(finished)},
      {"iteration", static_cast<double>(position_iteration(pos))},
      {"layers_complete",
       static_cast<double>(position_stage(pos) == kIterationDone ? -1.0
                                                                 : position_stage(pos))},
      {"dispatch_latency_count", static_cast<double>(dispatch_latency_.count())},
      {"dispatch_latency_p50_us", dispatch_latency_.quantile(0.50) / 1e3},
      {"dispatch_latency_p99_us", dispatch_latency_.quantile(0.99) / 1e3},
  };
}

}  // namespace kvsched::core
