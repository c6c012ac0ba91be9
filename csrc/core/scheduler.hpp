// The scheduler: both sides of SPEC sections 1-3 over the pieces in this directory.
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
// Consistency: linearizable per uuid (each transition is one atomic CAS/fetch_or); stats() is a
// best-effort snapshot. Every method may run concurrently with every other, including close();
// construction and destruction may not. Memory: removed uuids are remembered up to
// Config::removed_memory, cancelled rids up to the same bound, decided-but-untaken handles up to
// Config::poll_backlog. Not checked: that uuids are globally unique across requests beyond the
// checks of SPEC S1/S8.
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

#include "gate.hpp"
#include "latency_histogram.hpp"
#include "op.hpp"
#include "poll_queue.hpp"
#include "progress.hpp"
#include "ready_queue.hpp"
#include "removed_uuids.hpp"
#include "slot.hpp"
#include "sync.hpp"
#include "token_pool.hpp"
#include "types.hpp"

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
  // Waits until `op` is decided, the scheduler closes, or `deadline`. Returns the decision
  // (kNone on timeout or close).
  Decision wait_decision(const OpPtr& op, Clock::time_point deadline);
  // Each returned op carries one view reference for the caller to adopt (Op::views); a caller
  // that creates no handle object must give it back with release_view().
  std::vector<OpPtr> poll(size_t max_items, Clock::time_point deadline);
  // Gives back one view reference; fails the op as dropped if it was the last one (see
  // on_handle_dropped). Returns true then.
  bool release_view(const OpPtr& op);
  // ok=false marks the op failed with `error`. Throws ProtocolError for a second mark or for an op
  // not decided EXECUTE, and changes nothing then.
  void mark_complete(const OpPtr& op, bool ok, const std::string& error);
  // Claims delivery of a decided op (the user saw its decision). Returns true the first time.
  bool deliver(const OpPtr& op);
  // The binding layer's last handle object for `op` went away. Fails the op as dropped when its
  // decision was delivered, it was EXECUTE and it has no outcome yet; returns true then.
  bool on_handle_dropped(const OpPtr& op, bool evicted_from_backlog = false);

  void close();
  bool closed() const;
  std::vector<std::pair<std::string, double>> stats() const;
  const Config& config() const { return config_; }
  uint64_t progress_position() const { return progress_.load(); }

 private:
  struct alignas(128) Shard {
    Mutex mu;
    std::unordered_map<Uuid, OpPtr, UuidHash> map;  // live operations (and held outcomes)
  };
  struct WaitStripe {
    Mutex mu;
    CondVar cv;
  };
  struct Counters {
    Atomic<uint64_t> slots_created{0}, slots_removed{0}, enqueued{0}, scheduled{0},
        immediate{0}, joined{0}, executed{0}, completed{0}, failed{0}, cancelled{0}, dropped{0},
        timed_out{0}, late_cancelled{0}, removed_forgotten{0}, backlog_evicted{0},
        peak_inflight{0};
  };

  void check_open(const std::string& rid, const Uuid* uuid) const;
  SlotPtr find_slot(const std::string& rid) const;
  Shard& shard(const Uuid& u) { return shards_[UuidHash{}(u) & (shards_.size() - 1)]; }
  bool rid_cancelled_locked(const std::string& rid) const;
  void remember_cancelled_rid_locked(const std::string& rid);
  void forget_held_cancels(std::vector<OpPtr> evicted);

  void on_joined(const OpPtr& op);
  void make_ready(const OpPtr& op);
  void pump();
  void release_token();
  void release_gated(uint64_t position);
  bool decide(const OpPtr& op, Decision d, std::string error = {});
  bool end_op(const OpPtr& op, Outcome outcome, std::string error);
  void count_into_slot(const OpPtr& op);
  void notify_waiters(const Op& op);
  WaitStripe& stripe_for(const Op* op);
  OpPtr standalone_cancel(const std::string& rid, const Uuid& uuid, Mode mode);
  void remember_removed(const std::vector<OpPtr>& ops);
  bool is_removed_uuid(const Uuid& uuid);
  void deadline_loop();
  void note_inflight();
  void push_poll(const OpPtr& op);

  const Config config_;
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

  std::vector<Shard> shards_;
  std::vector<WaitStripe> stripes_;

  // rid registry: transfer halves waiting without a joined worker half, and cancelled rids.
  mutable Mutex rid_mu_;
  std::unordered_map<std::string, std::vector<OpPtr>> pending_by_rid_;  // guarded by rid_mu_
  // Cancelled rids, least recently cancelled first (cancelling again refreshes a rid), at most
  // Config::removed_memory of them. The map points into the list so create_slot() and a
  // re-cancel unlink a rid in O(1).
  std::list<std::string> cancelled_order_;                              // guarded by rid_mu_
  std::unordered_map<std::string, std::list<std::string>::iterator> cancelled_rids_;  // rid_mu_
  // Transfer halves decided CANCEL because their rid was cancelled before the worker half came
  // ("held cancels"): kept in the join table so the worker half, if it comes, joins and counts
  // the op as cancelled. Oldest first, at most Config::removed_memory.
  std::deque<OpPtr> held_cancels_;                                      // guarded by rid_mu_

  // Lock order: a shard lock may be held when taking removed_mu_, never the other way round.
  Mutex removed_mu_;
  RemovedUuids removed_;  // guarded by removed_mu_

  Mutex finished_mu_;
  std::vector<SlotPtr> finished_;       // guarded by finished_mu_
  size_t finished_compact_at_ = 1024;   // guarded by finished_mu_
  // Lock order: finished_mu_ -> slot mu (compaction); nothing takes them the other way.

  // Deadlines (op_timeout): FIFO, since every op gets the same timeout.
  Mutex deadline_mu_;
  CondVar deadline_cv_;
  std::deque<std::pair<Clock::time_point, OpPtr>> deadlines_;  // guarded by deadline_mu_
  bool deadline_stop_ = false;                                  // guarded by deadline_mu_
  std::thread deadline_thread_;
};

}  // namespace kvsched::core
