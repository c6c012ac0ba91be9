// Construction, the fork and closed checks, close(), deadline expiry (op_timeout), asyncio
// watchers, and statistics.
#include "scheduler.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "scheduler_detail.hpp"

namespace kvsched::core {

using namespace detail;

Scheduler::Scheduler(const Config& config)
    : config_(config),
      progress_(config.num_layers),
      tokens_(config.max_inflight),
      ready_(config.store_starvation_ns),
      poll_queue_(config.poll_backlog),
      table_(config.join_shards),
      rids_(config.removed_memory),
      removed_(config.removed_memory) {
  if (config.max_inflight < 1) throw Error(ErrorCode::kInvalidArgument, "max_inflight must be >= 1");
  if (config_.op_timeout_ns > 0) deadlines_.start([this](const OpPtr& op) { on_deadline(op); });
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

bool Scheduler::closed() const {
  // order: acquire — pairs with the exchange in close().
  return closed_.load(std::memory_order_acquire);
}

void Scheduler::note_inflight() {
  const uint64_t now = static_cast<uint64_t>(tokens_.in_use());
  // order: relaxed — statistic only (a high-water mark checked by tests against max_inflight).
  uint64_t peak = counters_.peak_inflight.load(std::memory_order_relaxed);
  while (now > peak && !counters_.peak_inflight.compare_exchange_weak(
                           peak, now, std::memory_order_relaxed, std::memory_order_relaxed)) {
  }
}

void Scheduler::on_deadline(const OpPtr& op) {
  // order: relaxed — advisory exemption, see make_ready().
  if (op->load_decision() != Decision::kNone || op->waiting_token.load(std::memory_order_relaxed))
    return;
  // order: acquire — pairs with the publish fetch_ors; reports which half is missing.
  const uint8_t h = op->halves.load(std::memory_order_acquire);
  const char* why = !(h & Op::kWorkerPublished)   ? "its worker half never arrived"
                    : !(h & Op::kTransferPublished) ? "its transfer half never arrived"
                                                    : "its requirement never held";
  char secs[64];
  std::snprintf(secs, sizeof secs, "%g", static_cast<double>(config_.op_timeout_ns) / 1e9);
  if (!decide(op, Decision::kCancel,
              "timed out after " + std::string(secs) + " s undecided (" + why + ")",
              /*timed_out=*/true))
    return;
  // A transfer half whose worker half never came is held (bounded) for a late worker half.
  if (!(h & Op::kWorkerPublished)) hold_decided_halves({op});
}

void Scheduler::close() {
  // order: acq_rel — publishes the closed state to check_open()/closed() readers; see the
  // re-checks after insertion in schedule()/enqueue() for why no op can slip past the scan.
  if (closed_.exchange(true, std::memory_order_acq_rel)) return;
  for (auto& op : table_.snapshot()) decide(op, Decision::kCancel);
  deadlines_.stop();
  poll_queue_.close();
  // Nobody can poll() any more: an undelivered EXECUTE op that no handle object holds would keep
  // its token for ever. Fail those as dropped (held ones are failed when their handle goes).
  for (auto& op : poll_queue_.drain()) on_handle_dropped(op, /*evicted_from_backlog=*/true);
  waiters_.wake_all();
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
  rids_.sizes(&pending, &held);
  {
    std::lock_guard<Mutex> lock(const_cast<Mutex&>(removed_mu_));
    removed = removed_.size();
  }
  finished = finished_.size();
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

}  // namespace kvsched::core
