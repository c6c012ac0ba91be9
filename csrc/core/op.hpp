// One operation (one uuid): the join cell and everything that follows it.
//
// State machine of the join cell (`halves`), see also docs/design.md "The join cell":
//
//        claim W                    publish W
//   {} ---------> {W?} ---------------------------> {W}            (worker half waits)
//    |                                               |
//    | claim T     publish T                         | claim T, publish T  => JOINED
//    +---------> {T?} ---> {T} -- claim W, publish W --> JOINED
//
// A half is first *claimed* (a fetch_or that also detects a duplicate of the same side without
// writing anything), then writes its own fields, then *publishes* with a release fetch_or. The
// half whose publish finds the other side already published performs the join: its acq_rel
// fetch_or acquires the other half's fields. Exactly one publish can observe both bits, so the
// join happens exactly once.
//
// After the join, three more single-transition atomics decide the rest of the op's life:
//   decision  kNone -> kExecute | kCancel        (one CAS; the winner owns the follow-up)
//   outcome   kOpen -> kCompleted|kFailed|kCancelled (one CAS: exactly-once completion, S4)
//   counted   {kEnqueued, kEnded} bits           (the fetch_or that completes the pair counts the
//                                                  op into its slot, whichever order they came)
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "async_notifier.hpp"
#include "sync.hpp"
#include "types.hpp"

namespace kvsched::core {

struct Slot;

struct Op {
  // Bits of `halves`.
  static constexpr uint8_t kWorkerClaimed = 1;
  static constexpr uint8_t kTransferClaimed = 2;
  static constexpr uint8_t kWorkerPublished = 4;
  static constexpr uint8_t kTransferPublished = 8;
  static constexpr uint8_t kBothPublished = kWorkerPublished | kTransferPublished;
  // Bits of `counted`.
  static constexpr uint8_t kEnqueued = 1;
  static constexpr uint8_t kEnded = 2;

  Op(const Uuid& u, std::string r, Mode m) : uuid(u), rid(std::move(r)), mode(m) {}

  // Identity: written once by the creator before the op is shared (under the join-table shard
  // lock or before it is returned), read-only afterwards.
  const Uuid uuid;
  const std::string rid;
  const Mode mode;

  // Worker half's fields: written after claiming kWorkerClaimed, published by kWorkerPublished.
  Kind kind = Kind::kLoad;
  std::shared_ptr<Slot> slot;

  // Transfer half's fields: written after claiming kTransferClaimed, published by
  // kTransferPublished.
  uint64_t requirement = 0;

  // Ready-queue bookkeeping: written by the thread that makes the op ready, before it is pushed
  // under the ready-queue lock; read under that lock.
  uint64_t ready_seq = 0;
  int64_t ready_ns = 0;
  // Time the progress mark that released this op was made (0: not released by a mark). Written
  // before make_ready, read by the thread that decides it (same thread or under the queue lock).
  int64_t released_at_ns = 0;

  // Written by the thread that wins `outcome`, before the kEnded fetch_or (release).
  std::string error;

  Atomic<uint8_t> halves{0};
  Atomic<uint8_t> decision{static_cast<uint8_t>(Decision::kNone)};
  Atomic<uint8_t> outcome{static_cast<uint8_t>(Outcome::kOpen)};
  Atomic<uint8_t> counted{0};
  // Set once the op is known to the ready queue (it only waits for a token): op_timeout exempts it.
  Atomic<bool> waiting_token{false};
  // The decision reached the user (wait/decision/poll). Exchange(true) claims delivery once.
  Atomic<bool> delivered{false};
  // Set by the first push into the poll queue, so an op is queued at most once.
  Atomic<bool> poll_queued{false};
  // Who may mark the op (values of `marker`): anyone while kFree; once a transfer engine claimed
  // its copy (Scheduler::claim_transfer) only that engine (kEngine), so no caller can end an op
  // whose bytes are still moving; once a caller started marking (kCaller) no engine may claim it,
  // so no copy can start for an ended op. One CAS decides between the two (no Dekker race).
  static constexpr uint8_t kMarkerFree = 0;
  static constexpr uint8_t kMarkerEngine = 1;
  static constexpr uint8_t kMarkerCaller = 2;
  Atomic<uint8_t> marker{kMarkerFree};
  // Number of live user-facing handle objects (maintained by the binding layer).
  Atomic<int32_t> views{0};
  // Threads blocked in Scheduler::wait_decision on this op (see Note [waiter handshake]).
  Atomic<uint32_t> waiters{0};

  // asyncio: the event loop's notifier told when this op is decided (Scheduler::watch). At most
  // one per op. `notifier` and `watch_token` are written once, by the thread that moves
  // `watch_state` from kWatchNone to kWatchWriting, before it stores kWatchSet; decide() reads
  // them only after loading kWatchSet.
  static constexpr uint8_t kWatchNone = 0;
  static constexpr uint8_t kWatchWriting = 1;
  static constexpr uint8_t kWatchSet = 2;
  Atomic<uint8_t> watch_state{kWatchNone};
  std::shared_ptr<AsyncNotifier> notifier;
  uint64_t watch_token = 0;

  // Opaque pointer for the binding layer (its current handle object). Only read and written with
  // the Python GIL held, never by the core.
  void* binding_view = nullptr;

  Decision load_decision() const {
    // order: acquire — pairs with the acq_rel CAS in Scheduler::decide(), so a reader that sees a
    // decision also sees everything the decider wrote before it.
    return static_cast<Decision>(decision.load(std::memory_order_acquire));
  }
  Outcome load_outcome() const {
    // order: acquire — pairs with the acq_rel CAS in Scheduler::end_op(); publishes `error`.
    return static_cast<Outcome>(outcome.load(std::memory_order_acquire));
  }
};

using OpPtr = std::shared_ptr<Op>;

}  // namespace kvsched::core
