// How a decision reaches the caller and how the caller ends an operation: blocking waits, poll(),
// delivery claims, marks (complete or failed), the transfer engine's copy claim, and the drop of
// a handle nobody marked (Note [handle views], Note [poll handshake], Note [copy claim] in
// docs/design.md).
#include "scheduler.hpp"

#include "scheduler_detail.hpp"

namespace kvsched::core {

using namespace detail;

namespace {

// Marks and copy claims need an op decided EXECUTE: ProtocolError (naming what was attempted)
// for an undecided or cancelled one.
void require_execute(const Op& op, const char* if_undecided, const char* if_cancelled) {
  const Decision d = op.load_decision();
  if (d != Decision::kExecute)
    fail(ErrorCode::kProtocol, op.rid, &op.uuid,
         d == Decision::kNone ? if_undecided : if_cancelled);
}

}  // namespace

Decision Scheduler::wait_decision(const OpPtr& op, Clock::time_point deadline) {
  Decision d = op->load_decision();
  if (d != Decision::kNone || closed()) return d;
  waiters_.wait(op, deadline, [this] { return closed(); });
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
  require_execute(*op, "mark_complete on an undecided handle",
                  "mark_complete on a handle decided CANCEL");
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
  require_execute(*op, "only an EXECUTE handle can be submitted, this one is undecided",
                  "only an EXECUTE handle can be submitted, this one is CANCEL");
  uint8_t free_marker = Op::kMarkerFree;
  // order: acq_rel — see mark_complete(): the one CAS that orders an engine's claim against a
  // caller's mark.
  if (!op->marker.compare_exchange_strong(free_marker, Op::kMarkerEngine,
                                          std::memory_order_acq_rel)) {
    fail(ErrorCode::kProtocol, op->rid, &op->uuid,
         free_marker != Op::kMarkerEngine
             ? "the operation has been marked (it ended, its blocks may belong to another request "
               "now); nothing copied"
         : op->load_outcome() == Outcome::kOpen
             ? "already submitted to a TransferEngine (its copy runs once; nothing copied again)"
             : "the operation has ended (its copy completed or failed); nothing copied again");
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

}  // namespace kvsched::core
