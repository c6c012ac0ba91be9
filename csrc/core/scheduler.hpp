// The scheduler: both sides of contract sections 1-3 (docs/contract.md) over the pieces in this
// directory.
//
// Contract (progress guarantee of each operation; "short lock" = a mutex held for O(1) or
// O(ops of one slot) work, never across a wait or a call out)
//   worker side
//     create_slot, remove_slot ............ blocking, short locks (slot table, slot, shards)
//     enqueue ............................. blocking, short locks (slot, one shard); the join
//                                           itself is one atomic transition (Op::halves)
//     start_next_iteration, mark_* ........ lock-free progress CAS, then a short gate lock to
//                                           release the operations it unblocks
//     is_complete ......................... shared lock on the slot table, then wait-free
//     take_finished ....................... short lock; O(slots finished since the last call)
//     cancel_slot ......................... short locks; O(ops of the rid)
//   transfer side
//     schedule ............................ short lock on one shard; then lock-free dispatch
//                                           when a token is free and nothing queues, else a
//                                           short ready-queue lock
//     mark_complete ....................... lock-free outcome CAS + wait-free counters; a short
//                                           lock only to record an error or a finished slot
//     wait_decision, poll ................. blocking with timeout (condition variables)
//   close ................................. blocking, O(live ops); idempotent
//   enqueue_many, schedule_many ........... all-or-nothing: every element is checked under the
//                                           slot lock and all the shard locks involved (taken in
//                                           shard order) before any is applied
// Consistency: linearizable per uuid (each transition is one atomic CAS/fetch_or); stats() is a
// best-effort snapshot. Every method may run concurrently with every other, including close();
// construction and destruction may not. Memory: removed uuids are remembered up to
// Config::removed_memory, cancelled rids up to the same bound, transfer halves decided CANCEL
// before any worker half came ("held halves": their rid was cancelled, or they timed out) up to
// the same bound, oldest forgotten first (stats: held_cancels, held_forgotten); decided-but-
// untaken handles up to Config::poll_backlog. Not checked: that uuids are globally unique across
// requests beyond the checks of contract S1/S8.
// Fork: a scheduler belongs to the process that created it; in a forked child every call raises
// ErrorCode::kForked (fork_guard.hpp) and the binding layer never destroys it there.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fork_guard.hpp"
#include "deadlines.hpp"
#include "finished_queue.hpp"
#include "gate.hpp"
#include "join_table.hpp"
#include "latency_histogram.hpp"
#include "op.hpp"
#include "poll_queue.hpp"
#include "progress.hpp"
#include "ready_queue.hpp"
#include "removed_uuids.hpp"
#include "rid_registry.hpp"
#include "slot.hpp"
#include "sync.hpp"
#include "token_pool.hpp"
#include "types.hpp"
#include "waiters.hpp"

namespace kvsched::core {

struct Config {
  int64_t max_inflight = 64;
  uint64_t num_layers = 0;               // 0: unknown
  int64_t op_timeout_ns = 0;             // 0: operations never time out
  size_t removed_memory = 65536;         // removed uuids / cancelled rids remembered
  size_t poll_backlog = 65536;           // decided handles waiting for poll()
  int64_t store_starvation_ns = 50'000'000;
  size_t join_shards = 64;               // power of two
};

struct SlotSnapshot {
  uint64_t expected = 0, completed = 0, failed = 0, cancelled = 0;
  std::vector<std::pair<Uuid, std::string>> errors;
};

using SlotPtr = std::shared_ptr<Slot>;
using Clock = std::chrono::steady_clock;

class Scheduler {
 public:
  explicit Scheduler(const Config& config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // ---- worker side ----
  void create_slot(const std::string& rid);
  void enqueue(const std::string& rid, const Uuid& uuid, Kind kind, Mode mode);
  // All or nothing: a duplicate (within the batch or with the table) or a disagreeing half
  // raises before any element is enqueued.
  void enqueue_many(const std::string& rid, const std::vector<Uuid>& uuids, Kind kind, Mode mode);
  uint64_t start_next_iteration();
  void mark_layer_complete(uint64_t layer);
  void mark_iteration_complete();
  bool is_complete(const std::string& rid) const;
  std::vector<std::string> take_finished();
  SlotSnapshot slot_status(const std::string& rid) const;
  void cancel_slot(const std::string& rid);
  void remove_slot(const std::string& rid);

  // ---- transfer side ----
  // Never blocks on other threads' progress. Returns the op (decided or not).
  OpPtr schedule(const std::string& rid, const Uuid& uuid, uint64_t requirement, Mode mode);
  // All or nothing, as enqueue_many.
  std::vector<OpPtr> schedule_many(const std::string& rid, const std::vector<Uuid>& uuids,
                                   uint64_t requirement, Mode mode);
  // Waits until `op` is decided, the scheduler closes, or `deadline`. Returns the decision
  // (kNone on timeout or close).
  Decision wait_decision(const OpPtr& op, Clock::time_point deadline);
  // Each returned op carries one view reference for the caller to adopt (Op::views); a caller
  // that creates no handle object must give it back with release_view().
  std::vector<OpPtr> poll(size_t max_items, Clock::time_point deadline);
  // Gives back one view reference; fails the op as dropped if it was the last one (see
  // on_handle_dropped). Returns true then.
  bool release_view(const OpPtr& op);
  // ok=false marks the op failed with `error` (cut to kMaxErrorBytes). Throws ProtocolError for a
  // second mark, for an op not decided EXECUTE, or (by_engine=false) for an op a transfer engine
  // has claimed, and changes nothing then.
  void mark_complete(const OpPtr& op, bool ok, const std::string& error, bool by_engine = false);
  // A transfer engine takes the op's copy: throws ProtocolError unless the op is decided EXECUTE,
  // has not ended and no engine claimed it before. release_transfer_claim() gives it back (the
  // engine refused the job before copying anything).
  void claim_transfer(const OpPtr& op);
  void release_transfer_claim(const OpPtr& op);
  // asyncio: asks that `notifier` gets `token` once `op` is decided. kWatching: it will (possibly
  // twice); kDecided: the op is already decided (resolve now; the token may still be posted);
  // kBusy: another notifier watches this op (see Op::watch_state). Never blocks.
  enum class WatchResult { kWatching, kDecided, kBusy };
  WatchResult watch(const OpPtr& op, const std::shared_ptr<AsyncNotifier>& notifier,
                    uint64_t token);
  // Claims delivery of a decided op (the user saw its decision). Returns true the first time.
  bool deliver(const OpPtr& op);
  // The binding layer's last handle object for `op` went away. Fails the op as dropped when its
  // decision was delivered, it was EXECUTE and it has no outcome yet; returns true then.
  bool on_handle_dropped(const OpPtr& op, bool evicted_from_backlog = false);

  void close();
  bool closed() const;
  // True in a process forked from the one that created this scheduler (fork_guard.hpp).
  bool inherited() const { return fork_generation() != fork_generation_; }
  // Throws ErrorCode::kForked when inherited().
  void check_not_inherited() const;
  std::vector<std::pair<std::string, double>> stats() const;
  const Config& config() const { return config_; }
  uint64_t progress_position() const { return progress_.load(); }

 private:
  using Shard = JoinTable::Shard;
  struct Counters {
    Atomic<uint64_t> slots_created{0}, slots_removed{0}, enqueued{0}, scheduled{0},
        immediate{0}, joined{0}, executed{0}, completed{0}, failed{0}, cancelled{0}, dropped{0},
        timed_out{0}, late_cancelled{0}, removed_forgotten{0}, backlog_evicted{0},
        held_forgotten{0}, peak_inflight{0};
  };

  // An op claimed under its shard lock by schedule()/schedule_many(), finished after the locks.
  struct ScheduleClaim {
    OpPtr op;
    bool created = false;
    bool late = false;         // a half of a removed slot's op: decided CANCEL standalone
    bool held_cancel = false;  // its rid is cancelled: born CANCEL and held
  };
  struct EnqueueClaim {
    OpPtr op;
    bool created = false;
  };

  void check_open(const std::string& rid, const Uuid* uuid) const;
  void check_open_worker_call() const;
  // Checks one element under its shard lock (and slot->mu): throws, changes nothing.
  OpPtr enqueue_check_locked(Shard& sh, const std::string& rid, const Uuid& uuid, Mode mode);
  EnqueueClaim enqueue_claim_locked(Shard& sh, const SlotPtr& slot, OpPtr existing,
                                    const std::string& rid, const Uuid& uuid, Kind kind,
                                    Mode mode);
  void enqueue_finish(const EnqueueClaim& claim, Mode mode, bool cancel_now);
  // Returns the existing op (or null); *late: the uuid belongs to a removed slot's op.
  OpPtr schedule_check_locked(Shard& sh, const std::string& rid, const Uuid& uuid, Mode mode,
                              bool* late);
  // Creating claims need the rid registry's lock held (caller), see schedule().
  ScheduleClaim schedule_claim_locked(Shard& sh, OpPtr existing, bool late,
                                      const std::string& rid, const Uuid& uuid, Mode mode,
                                      std::vector<OpPtr>* evicted_held);
  OpPtr schedule_finish(ScheduleClaim& claim, const std::string& rid, const Uuid& uuid,
                        uint64_t requirement, Mode mode);
  // Transfer halves decided CANCEL without a worker half (rid cancelled, or timed out): held in
  // the registry's bounded list; what falls out of it leaves the join table.
  void hold_decided_halves(const std::vector<OpPtr>& ops);
  void on_deadline(const OpPtr& op);
  static void check_distinct(const std::string& rid, const std::vector<Uuid>& uuids);
  SlotPtr find_slot(const std::string& rid) const;
  void forget_held_cancels(std::vector<OpPtr> evicted);

  void on_joined(const OpPtr& op);
  void make_ready(const OpPtr& op);
  void pump();
  void release_token();
  void release_gated(uint64_t position);
  // `timed_out`: the decision is a deadline's; its counter is bumped before anyone is woken.
  bool decide(const OpPtr& op, Decision d, std::string error = {}, bool timed_out = false);
  bool end_op(const OpPtr& op, Outcome outcome, std::string error);
  void count_into_slot(const OpPtr& op);
  void notify_watcher(const Op& op);
  OpPtr standalone_cancel(const std::string& rid, const Uuid& uuid, Mode mode);
  void remember_removed(const std::vector<OpPtr>& ops);
  bool is_removed_uuid(const Uuid& uuid);
  void note_inflight();
  void push_poll(const OpPtr& op);

  // Lock order, whole core (each lock is short; none is held across a wait or a call out):
  //   slots_mu_ -> Slot::mu -> join-table shard -> rid registry -> removed_mu_
  //   FinishedQueue -> Slot::mu;  ready_mu_, gate, poll queue, waiter stripes, deadlines,
  //   notifiers: leaves (nothing is taken under them).
  const Config config_;
  const uint64_t fork_generation_ = fork_generation();
  const long creator_pid_ = static_cast<long>(getpid());
  Progress progress_;
  TokenPool tokens_;
  Gate gate_;
  Mutex ready_mu_;
  ReadyQueue ready_;  // guarded by ready_mu_ (its `queued` count is readable without it)
  PollQueue poll_queue_;
  LatencyHistogram dispatch_latency_;
  Counters counters_;
  Atomic<uint64_t> ready_seq_{0};
  Atomic<bool> closed_{false};

  mutable SharedMutex slots_mu_;
  std::unordered_map<std::string, SlotPtr> slots_;  // guarded by slots_mu_

  JoinTable table_;
  Waiters waiters_;
  RidRegistry rids_;
  Mutex removed_mu_;
  RemovedUuids removed_;  // guarded by removed_mu_
  FinishedQueue finished_;
  Deadlines deadlines_;  // last: its thread stops (in close()) before the rest is destroyed
};

}  // namespace kvsched::core
