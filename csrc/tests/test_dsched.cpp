// Deterministic-schedule tests of the core (STYLE.md B4/B7): the core is compiled with its sync seam
// swapped for csrc/tests/dsched.hpp, and each scenario runs under many seeded interleavings.
//
//   test_dsched [seeds] [first_seed] [scenario]
//
// Each scenario prints one summary line (seeds, scheduling steps, failures). A failing seed prints
// its messages and the command that replays it; DSCHED_TRACE=1 prints every scheduling step of a
// replay, DSCHED_REPLAY_CHECK=1 runs every seed twice and checks that the schedules are identical.
//
// Scenarios (tiny configs: max_inflight 1-2, join_shards 1-2, removed_memory 1-2, poll_backlog
// 1-2 unless noted; op_timeout 0, so the core starts no thread of its own):
//   selftest  the harness finds a lost update and a lost wakeup, Mutex excludes, timed waits
//   join      worker enqueue vs transfer schedule of the same uuids (both orders), one executor
//   tokens    3-4 ops ready at once, max_inflight 1 (sometimes 2), one executor per op
//   cancel    cancel_slot (once or twice) racing enqueue, schedule and marks; a second slot
//   gating    progress marks racing schedule of gated ops, plus a racing duplicate layer mark
//   close     close() (once or twice) racing enqueue, schedule, waits, poll and progress marks
//   remove    remove_slot, late transfer halves (remembered and forgotten uuids), rid reuse
//   poll      executors driven only by poll(), with a cancel racing both halves
//   held      cancel_slot of a rid with no slot racing transfer halves, create_slot and the
//             worker halves: held CANCEL outcomes are joined, counted once, slot completes
//   watch     two event-loop notifiers register (Scheduler::watch) racing the join and a
//             cancel_slot: no lost wake-up, one notifier per op, no token to the other
//
// Oracles that can fail (STYLE.md B7, "global invariants"):
//   - exactly one decision per op, and outcome consistent with it (EXECUTE -> completed/failed,
//     CANCEL -> cancelled), slot counters exact, is_complete, take_finished;
//   - token bound: stats()["inflight"] <= max_inflight at every step, and the executors' own count
//     of "saw EXECUTE, not yet marked" never exceeds max_inflight nor the tokens in use;
//   - gating: an executor that sees EXECUTE reads progress_position() >= the requirement;
//   - liveness: every wait returns. A stranded op or a lost wakeup leaves all threads blocked, which
//     DSched reports as "deadlock/lost wakeup" with the seed.
//
// Handles: the binding layer counts live handle objects in Op::views; these tests do the same
// (hold() right after schedule() returns). An op decided EXECUTE inside schedule() and evicted
// from a tiny poll backlog before the caller could hold it is legitimately failed as dropped
// (docs/semantics.md, "Backlog"); the oracles allow for exactly that and nothing else.
#ifndef KVSCHED_SYNC_HEADER
#error "test_dsched.cpp must be compiled with KVSCHED_SYNC_HEADER pointing at dsched.hpp"
#endif

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/scheduler.hpp"

namespace ds = kvsched::dsched;
using namespace kvsched::core;

// ------------------------------------------------------------------------------------------------
// Deterministic addresses (modulo 64) for replay.
//
// The core picks a wait stripe from an op's address (std::hash<const void*>, the identity in
// libstdc++, modulo 64 stripes), so whether two waiting ops share a stripe, and with it the
// schedule, would depend on the heap's history: a seed would not replay alone as it ran in a
// sequence. This replacement operator new places every block at an offset modulo 64 chosen by a
// per-run allocation counter (reset before each seed). Allocations happen in a deterministic order
// (main before the run, then under the baton), so a seed's addresses modulo 64 are the same in
// every run. The block is 64-aligned and ends exactly where the object ends, so ASan still sees
// overflows past the end (not underflows into the leading offset); delete finds the block start
// by rounding down to 64. Define KVSCHED_DSCHED_PLAIN_NEW to use the standard operator new.
#ifndef KVSCHED_DSCHED_PLAIN_NEW
namespace {
std::atomic<uint64_t> g_alloc_count{0};
void* det_alloc(size_t n) {
  const uint64_t k = g_alloc_count.fetch_add(1, std::memory_order_relaxed);
  const size_t off = 16 * (k % 4);
  void* block = nullptr;
  if (posix_memalign(&block, 64, std::max<size_t>(1, n + off)) != 0) return nullptr;
  return static_cast<char*>(block) + off;
}
void det_free(void* p) {
  if (p) std::free(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63}));
}
void reset_alloc_order() { g_alloc_count.store(0, std::memory_order_relaxed); }
}  // namespace
void* operator new(size_t n) {
  if (void* p = det_alloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) {
  if (void* p = det_alloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new(size_t n, const std::nothrow_t&) noexcept { return det_alloc(n); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return det_alloc(n); }
void operator delete(void* p) noexcept { det_free(p); }
void operator delete[](void* p) noexcept { det_free(p); }
void operator delete(void* p, size_t) noexcept { det_free(p); }
void operator delete[](void* p, size_t) noexcept { det_free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { det_free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { det_free(p); }
#else
namespace {
void reset_alloc_order() {}
}  // namespace
#endif

namespace {

// ------------------------------------------------------------------------------------------------
// checks

template <class... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  (void)(os << ... << a);
  return os.str();
}

std::string who() {
  if (ds::detail::tl_sched) return ds::detail::tl_sched->thread_name(ds::detail::tl_tid);
  return "main";
}

#define DS_CHECK(cond, ...)                                                                   \
  do {                                                                                        \
    if (!(cond))                                                                              \
      ds::Log::add(cat(__FILE__, ":", __LINE__, " [", who(), "] check failed: ", #cond, ": ", \
                       __VA_ARGS__));                                                         \
  } while (0)

const char* dname(Decision d) {
  return d == Decision::kExecute ? "EXECUTE" : d == Decision::kCancel ? "CANCEL" : "NONE";
}
const char* oname(Outcome o) {
  switch (o) {
    case Outcome::kOpen: return "open";
    case Outcome::kCompleted: return "completed";
    case Outcome::kFailed: return "failed";
    case Outcome::kCancelled: return "cancelled";
  }
  return "?";
}

double stat(const Scheduler& s, const char* name) {
  for (auto& kv : s.stats())
    if (kv.first == name) return kv.second;
  ds::Log::add(cat("no stat named ", name));
  return -1;
}

// Runs f, which must throw Error with `code`.
template <class F>
void expect_error(ErrorCode code, F f, const char* what) {
  try {
    f();
    ds::Log::add(cat("[", who(), "] ", what, ": no error raised"));
  } catch (const Error& e) {
    if (e.code() != code)
      ds::Log::add(cat("[", who(), "] ", what, ": wrong error code ", static_cast<int>(e.code()),
                       ": ", e.what()));
  }
}

// ------------------------------------------------------------------------------------------------
// per-seed choices (independent of the schedule's PRNG)

struct Pick {
  uint64_t s;
  explicit Pick(uint64_t seed) : s(seed ^ 0x5eedf00dcafe1234ULL) {}
  uint64_t next() { return ds::detail::splitmix(s); }
  uint64_t below(uint64_t n) { return n <= 1 ? 0 : next() % n; }
  bool coin() { return next() & 1; }
  template <class T>
  void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }
};

Uuid U(uint64_t i) { return Uuid{0x1111000000000000ULL + i, 0x2222000000000000ULL + 7 * i}; }

Config tiny(Pick& p, int64_t max_inflight) {
  Config c;
  c.max_inflight = max_inflight;
  c.num_layers = 0;
  c.op_timeout_ns = 0;  // no deadline thread: every thread of a run is a DSched thread
  c.removed_memory = 1 + p.below(2);
  c.poll_backlog = 1 + p.below(2);
  c.join_shards = 1 + p.below(2);
  // The ready queue reads the real clock only for store aging; keep it out of the schedule so a
  // seed replays exactly (the store-aging rule is covered by the unit tests).
  c.store_starvation_ns = int64_t{1} << 60;
  return c;
}

// ------------------------------------------------------------------------------------------------
// the world of one run: the scheduler under test plus the test's ledger (guarded by the baton)

struct OpRec {
  std::string rid;
  Uuid u;
  Kind kind = Kind::kLoad;
  Mode mode = Mode::kScheduled;
  uint64_t req = 0;
  bool mark_ok = true;
  int exec_yields = 0;        // scheduling points between "saw EXECUTE" and mark_complete
  bool second_mark = false;   // mark twice: the second must raise ProtocolError
  // filled in by the run
  OpPtr op;                   // handle returned by schedule()
  bool enqueued = false;      // worker half accepted
  bool schedule_failed = false;
  Decision seen = Decision::kNone;  // what wait_decision returned
  bool marked = false;
  bool dropped = false;       // found failed as dropped by the executor
  bool waiting = false;       // transfer thread is inside wait_decision
};

struct World {
  explicit World(const Config& c) : s(std::make_unique<Scheduler>(c)), cfg(c) {}
  std::unique_ptr<Scheduler> s;
  Config cfg;
  std::vector<OpRec> recs;  // fixed before the run starts (threads keep references)
  // executors' count: indexes of recs that saw EXECUTE and are not yet marked
  std::vector<int> executing;
  // states where that count exceeded a bound; re-checked after the run without dropped ops
  struct Snap {
    std::vector<int> set;
    int64_t bound;
    std::string what;
  };
  std::vector<Snap> suspicious;
  uint64_t last_progress = 0;
};

// A counter test threads can wait on; built on the seam, so DSched sees the waits.
class Gauge {
 public:
  void add(int d = 1) {
    std::lock_guard<Mutex> lock(mu_);
    v_ += d;
    cv_.notify_all();
  }
  void wait_at_least(int n) {
    std::unique_lock<Mutex> lock(mu_);
    cv_.wait(lock, [&] { return v_ >= n; });
  }

 private:
  Mutex mu_;
  CondVar cv_;
  int v_ = 0;
};

void hold(const OpPtr& op) {
  // order: release — as the binding's Handle constructor.
  op->views.fetch_add(1, std::memory_order_release);
}
// Gives back a view (the handle object goes away), as the binding's Handle destructor does.
void unhold(Scheduler& s, const OpPtr& op) {
  const bool failed = s.release_view(op);
  DS_CHECK(!failed, "releasing a handle of ", op->uuid.str(),
           " failed it as dropped although it had ended, was not EXECUTE or was still held");
}

uint64_t g_dropped_ops = 0;  // ops found failed as dropped, for the summary line

bool dropped_op(const OpRec& r) {
  return r.op && r.op->load_outcome() == Outcome::kFailed &&
         r.op->error.find("HandleDropped") != std::string::npos;
}

// The per-step invariant shared by all scenarios (runs in DSched's aux mode: a lock held by a
// suspended thread makes stats() throw AuxSkip and the step is skipped).
void common_invariant(World& w) {
  const auto st = w.s->stats();
  double inflight = -1, peak = -1, maxi = -1;
  for (auto& kv : st) {
    if (kv.first == "inflight") inflight = kv.second;
    else if (kv.first == "peak_inflight") peak = kv.second;
    else if (kv.first == "max_inflight") maxi = kv.second;
  }
  DS_CHECK(inflight >= 0 && inflight <= maxi, "tokens in use ", inflight, " max ", maxi);
  DS_CHECK(peak <= maxi, "peak_inflight ", peak, " > max_inflight ", maxi);
  if (static_cast<double>(w.executing.size()) > inflight)
    w.suspicious.push_back({w.executing, static_cast<int64_t>(inflight),
                            "executors see more EXECUTE-not-marked ops than tokens in use"});
  const uint64_t pos = w.s->progress_position();
  DS_CHECK(pos >= w.last_progress, "progress went back from ", w.last_progress, " to ", pos);
  w.last_progress = pos;
}

// After the run: the executors' counts must hold once ops failed as dropped (whose token was
// released behind the executor's back, see the header comment) are taken out.
void check_suspicious(World& w) {
  std::set<int> dropped;
  for (size_t i = 0; i < w.recs.size(); ++i)
    if (w.recs[i].dropped || dropped_op(w.recs[i])) dropped.insert(static_cast<int>(i));
  for (auto& snap : w.suspicious) {
    int64_t n = 0;
    for (int i : snap.set) n += dropped.count(i) ? 0 : 1;
    DS_CHECK(n <= snap.bound, snap.what, ": ", n, " > ", snap.bound);
  }
}

// The executor's part once it saw EXECUTE for rec `idx`.
void execute(World& w, int idx, const OpPtr& op) {
  OpRec& r = w.recs[idx];
  if (r.req != 0) {
    const uint64_t pos = w.s->progress_position();
    DS_CHECK(pos >= r.req, r.u.str(), " decided EXECUTE at progress ", pos, " before its requirement ",
             r.req);
  }
  if (op->load_outcome() != Outcome::kOpen) {
    // Failed as dropped before this thread held the handle (evicted from the poll backlog).
    r.dropped = true;
    DS_CHECK(op->load_outcome() == Outcome::kFailed, r.u.str(), " EXECUTE op ended as ",
             oname(op->load_outcome()), " before any mark");
    expect_error(ErrorCode::kProtocol, [&] { w.s->mark_complete(op, true, ""); },
                 "mark_complete of an op failed as dropped");
    return;
  }
  w.executing.push_back(idx);
  if (static_cast<int64_t>(w.executing.size()) > w.cfg.max_inflight)
    w.suspicious.push_back({w.executing, w.cfg.max_inflight, "executors exceed max_inflight"});
  ds::yield_points(r.exec_yields);
  w.executing.erase(std::find(w.executing.begin(), w.executing.end(), idx));
  try {
    w.s->mark_complete(op, r.mark_ok, r.mark_ok ? std::string() : "boom " + r.u.str());
    r.marked = true;
  } catch (const Error& e) {
    // Only a drop that was already under way when this thread took its handle can win the race.
    r.dropped = true;
    DS_CHECK(e.code() == ErrorCode::kProtocol, "mark_complete raised ", e.what());
  }
  if (r.marked && r.second_mark)
    expect_error(ErrorCode::kProtocol, [&] { w.s->mark_complete(op, true, ""); }, "second mark");
}

// A transfer thread for rec `idx`: schedule, hold the handle, wait, execute or accept a cancel.
void transfer(World& w, int idx) {
  OpRec& r = w.recs[idx];
  OpPtr op = w.s->schedule(r.rid, r.u, r.req, r.mode);
  hold(op);
  r.op = op;
  r.waiting = true;
  const Decision d = w.s->wait_decision(op, Clock::time_point::max());
  r.waiting = false;
  r.seen = d;
  DS_CHECK(d != Decision::kNone || w.s->closed(), r.u.str(), ": wait_decision returned NONE");
  // NONE after close(): the op may still be decided EXECUTE by a dispatch racing close()'s scan
  // (and then be delivered through poll). Dropping the handle now would rightly fail it as
  // dropped; this thread keeps it instead, and the scenario resolves it after the run.
  if (d == Decision::kNone) return;
  w.s->deliver(op);
  if (d == Decision::kExecute) execute(w, idx, op);
  unhold(*w.s, op);
}

// After the run: per op, the decision the executor saw is the op's decision, and its outcome
// matches it.
void check_outcomes(World& w) {
  for (auto& r : w.recs) {
    if (!r.op) continue;
    const Decision d = r.op->load_decision();
    const Outcome o = r.op->load_outcome();
    if (r.seen != Decision::kNone)
      DS_CHECK(d == r.seen, r.u.str(), " waited ", dname(r.seen), " but is ", dname(d));
    if (d == Decision::kExecute)
      DS_CHECK(o == Outcome::kCompleted || o == Outcome::kFailed, r.u.str(),
               " EXECUTE but ended ", oname(o));
    if (d == Decision::kCancel)
      DS_CHECK(o == Outcome::kCancelled, r.u.str(), " CANCEL but ended ", oname(o));
    if (r.marked)
      DS_CHECK(o == (r.mark_ok ? Outcome::kCompleted : Outcome::kFailed), r.u.str(),
               " marked ", r.mark_ok, " but ended ", oname(o));
    if (r.dropped) DS_CHECK(dropped_op(r), r.u.str(), " seen dropped but its error is '",
                            r.op->error, "'");
    g_dropped_ops += dropped_op(r);
  }
}

void check_slot(Scheduler& s, const std::string& rid, uint64_t expected, uint64_t completed,
                uint64_t failed, uint64_t cancelled) {
  DS_CHECK(s.is_complete(rid), "slot ", rid, " not complete");
  const SlotSnapshot snap = s.slot_status(rid);
  DS_CHECK(snap.expected == expected && snap.completed == completed && snap.failed == failed &&
               snap.cancelled == cancelled,
           "slot ", rid, " counts e/c/f/x ", snap.expected, "/", snap.completed, "/", snap.failed,
           "/", snap.cancelled, ", want ", expected, "/", completed, "/", failed, "/", cancelled);
  DS_CHECK(snap.errors.size() == failed, "slot ", rid, " has ", snap.errors.size(),
           " errors for ", failed, " failed ops");
}

// What a scenario hands back: the run, plus whether the world may be freed.
using Scenario = ds::Result (*)(uint64_t seed, ds::Options opt);

ds::Result finish(std::unique_ptr<World>& w, const ds::Result& r) {
  if (r.abandoned) (void)w.release();  // its threads are blocked for ever inside it
  return r;
}

// ------------------------------------------------------------------------------------------------
// 1. join race: worker enqueue vs transfer schedule of the same uuids, both orders; one executor.

ds::Result scenario_join(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  // Two SCHEDULED ops and max_inflight 2, so the single executor may wait in any order (token
  // contention is scenario 2's subject); sometimes a third, IMMEDIATE op (no token).
  Config c = tiny(p, 2);
  auto w = std::make_unique<World>(c);
  const bool immediate = p.coin();
  const int n = immediate ? 3 : 2;
  for (int i = 0; i < n; ++i) {
    OpRec r;
    r.rid = "r";
    r.u = U(i);
    r.kind = p.coin() ? Kind::kLoad : Kind::kStore;
    r.mode = (immediate && i == 2) ? Mode::kImmediate : Mode::kScheduled;
    r.mark_ok = i != 1;
    r.exec_yields = static_cast<int>(p.below(3));
    r.second_mark = p.below(4) == 0;
    w->recs.push_back(r);
  }
  std::vector<int> worder(n), torder(n);
  for (int i = 0; i < n; ++i) worder[i] = torder[i] = i;
  p.shuffle(worder);
  p.shuffle(torder);
  w->s->create_slot("r");
  World& W = *w;
  auto scheduled = std::make_shared<Gauge>();
  std::vector<ds::ThreadSpec> ts;
  ts.push_back({"worker", [&W, worder] {
                  for (int i : worder) {
                    OpRec& r = W.recs[i];
                    W.s->enqueue(r.rid, r.u, r.kind, r.mode);
                    r.enqueued = true;
                  }
                  // is_complete() once every worker half is in: then the counters are final.
                  if (W.s->is_complete("r")) {
                    const SlotSnapshot snap = W.s->slot_status("r");
                    DS_CHECK(snap.completed + snap.failed + snap.cancelled == snap.expected,
                             "is_complete but counts ", snap.completed, "+", snap.failed, "+",
                             snap.cancelled, " != ", snap.expected);
                  }
                }});
  ts.push_back({"transfer", [&W, torder, scheduled] {
                  for (int i : torder) {
                    OpRec& r = W.recs[i];
                    OpPtr op = W.s->schedule(r.rid, r.u, 0, r.mode);
                    hold(op);
                    r.op = op;
                    if (r.mode == Mode::kImmediate) {
                      // IMMEDIATE: decided at birth; marked at once, maybe before the worker half
                      // exists (the outcome is held until it arrives).
                      DS_CHECK(op->load_decision() == Decision::kExecute,
                               "IMMEDIATE schedule returned ", dname(op->load_decision()));
                      r.seen = Decision::kExecute;
                      W.s->mark_complete(op, r.mark_ok, r.mark_ok ? "" : "boom");
                      r.marked = true;
                      unhold(*W.s, op);
                    }
                    scheduled->add();
                  }
                }});
  ts.push_back({"executor", [&W, torder, scheduled] {
                  int k = 0;
                  for (int i : torder) {
                    scheduled->wait_at_least(++k);
                    OpRec& r = W.recs[i];
                    if (r.mode == Mode::kImmediate) continue;
                    const Decision d = W.s->wait_decision(r.op, Clock::time_point::max());
                    r.seen = d;
                    DS_CHECK(d == Decision::kExecute, r.u.str(), " decided ", dname(d));
                    W.s->deliver(r.op);
                    if (d == Decision::kExecute) execute(W, i, r.op);
                    unhold(*W.s, r.op);  // the transfer thread's handle, passed on
                  }
                }});
  opt.invariant = [&W] { common_invariant(W); };
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *w->s;
  check_outcomes(*w);
  check_suspicious(*w);
  uint64_t ok = 0, failed = 0;
  for (auto& r : w->recs) {
    DS_CHECK(r.op && r.op->load_decision() == Decision::kExecute, r.u.str(), " not EXECUTE");
    DS_CHECK(r.enqueued, r.u.str(), " not enqueued");
    if (r.op->load_outcome() == Outcome::kCompleted) ++ok;
    if (r.op->load_outcome() == Outcome::kFailed) ++failed;
  }
  DS_CHECK(stat(s, "executed") == n, "executed ", stat(s, "executed"), " for ", n, " ops");
  DS_CHECK(stat(s, "joined") == n, "joined ", stat(s, "joined"), " for ", n, " ops");
  DS_CHECK(stat(s, "cancelled") == 0, "cancelled ", stat(s, "cancelled"));
  DS_CHECK(stat(s, "completed") == ok && stat(s, "failed") == failed, "global counters");
  DS_CHECK(stat(s, "inflight") == 0, "tokens still in use: ", stat(s, "inflight"));
  DS_CHECK(stat(s, "gated") == 0 && stat(s, "ready_queued") == 0, "ops left gated/queued");
  check_slot(s, "r", n, ok, failed, 0);
  // take_finished reports r each time its open count drops to zero: at least once, at most once
  // per op (the worker may enqueue the next op after the previous one ended).
  const auto fin = s.take_finished();
  DS_CHECK(!fin.empty() && fin.size() <= static_cast<size_t>(n) &&
               std::all_of(fin.begin(), fin.end(), [](const std::string& x) { return x == "r"; }),
           "take_finished returned ", fin.size(), " rids");
  DS_CHECK(s.take_finished().empty(), "take_finished reported r again");
  s.remove_slot("r");
  DS_CHECK(stat(s, "pending_transfer_halves") == 0 && stat(s, "slots") == 0, "state after remove");
  return res;
}

// ------------------------------------------------------------------------------------------------
// 2. tokens: 3-4 ops ready at once with max_inflight 1 (sometimes 2), one executor per op.

ds::Result scenario_tokens(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  const int64_t mi = p.below(4) == 0 ? 2 : 1;
  Config c = tiny(p, mi);
  auto w = std::make_unique<World>(c);
  const int n = 3 + static_cast<int>(p.below(2));
  for (int i = 0; i < n; ++i) {
    OpRec r;
    r.rid = "r";
    r.u = U(i);
    r.kind = p.coin() ? Kind::kLoad : Kind::kStore;
    r.exec_yields = static_cast<int>(p.below(3));
    r.mark_ok = p.below(4) != 0;
    r.second_mark = p.below(4) == 0;
    w->recs.push_back(r);
  }
  std::vector<int> worder(n);
  for (int i = 0; i < n; ++i) worder[i] = i;
  p.shuffle(worder);
  w->s->create_slot("r");
  World& W = *w;
  std::vector<ds::ThreadSpec> ts;
  ts.push_back({"worker", [&W, worder] {
                  for (int i : worder) {
                    OpRec& r = W.recs[i];
                    W.s->enqueue(r.rid, r.u, r.kind, r.mode);
                    r.enqueued = true;
                  }
                }});
  for (int i = 0; i < n; ++i) ts.push_back({cat("transfer", i), [&W, i] { transfer(W, i); }});
  opt.invariant = [&W] { common_invariant(W); };
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *w->s;
  check_outcomes(*w);
  check_suspicious(*w);
  uint64_t ok = 0, failed = 0;
  for (auto& r : w->recs) {
    DS_CHECK(r.seen == Decision::kExecute, r.u.str(), " saw ", dname(r.seen));
    if (r.op->load_outcome() == Outcome::kCompleted) ++ok;
    if (r.op->load_outcome() == Outcome::kFailed) ++failed;
  }
  DS_CHECK(stat(s, "executed") == n, "executed ", stat(s, "executed"), " for ", n, " ops");
  DS_CHECK(stat(s, "completed") == ok && stat(s, "failed") == failed, "global counters");
  DS_CHECK(stat(s, "peak_inflight") <= mi, "peak_inflight ", stat(s, "peak_inflight"));
  DS_CHECK(stat(s, "inflight") == 0, "tokens still in use: ", stat(s, "inflight"));
  DS_CHECK(stat(s, "ready_queued") == 0 && stat(s, "gated") == 0, "ops left queued");
  check_slot(s, "r", n, ok, failed, 0);
  return res;
}

// ------------------------------------------------------------------------------------------------
// 3. cancel_slot racing schedule, enqueue and mark.

ds::Result scenario_cancel(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  Config c = tiny(p, 1 + static_cast<int64_t>(p.below(2)));
  auto w = std::make_unique<World>(c);
  // r: u0, u1 ready at once, u2 gated on a requirement that never holds; q: u3, not cancelled.
  for (int i = 0; i < 4; ++i) {
    OpRec r;
    r.rid = i < 3 ? "r" : "q";
    r.u = U(i);
    r.kind = p.coin() ? Kind::kLoad : Kind::kStore;
    r.req = i == 2 ? layer_requirement(0, 7) : 0;
    r.exec_yields = static_cast<int>(p.below(3));
    w->recs.push_back(r);
  }
  std::vector<int> worder = {0, 1, 2, 3};
  p.shuffle(worder);
  const int cancel_delay = static_cast<int>(p.below(30));
  const bool two_cancels = p.below(3) == 0;
  w->s->create_slot("r");
  w->s->create_slot("q");
  World& W = *w;
  std::vector<ds::ThreadSpec> ts;
  ts.push_back({"worker", [&W, worder] {
                  for (int i : worder) {
                    OpRec& r = W.recs[i];
                    W.s->enqueue(r.rid, r.u, r.kind, r.mode);
                    r.enqueued = true;
                  }
                }});
  for (int i = 0; i < 4; ++i) ts.push_back({cat("transfer", i), [&W, i] { transfer(W, i); }});
  ts.push_back({"cancel", [&W, cancel_delay] {
                  ds::yield_points(cancel_delay);
                  W.s->cancel_slot("r");
                }});
  if (two_cancels) ts.push_back({"cancel2", [&W] { W.s->cancel_slot("r"); }});
  opt.invariant = [&W] {
    common_invariant(W);
    const SlotSnapshot snap = W.s->slot_status("r");
    DS_CHECK(snap.completed + snap.failed + snap.cancelled <= snap.expected,
             "slot r counts more ends than ops: ", snap.completed, "+", snap.failed, "+",
             snap.cancelled, " > ", snap.expected);
  };
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *w->s;
  check_outcomes(*w);
  check_suspicious(*w);
  uint64_t r_exec = 0, r_cancel = 0, r_failed = 0, executed = 0;
  for (auto& r : w->recs) {
    DS_CHECK(r.seen != Decision::kNone, r.u.str(), " undecided");
    if (r.seen == Decision::kExecute) ++executed;
    if (r.rid != "r") continue;
    if (r.seen == Decision::kExecute) ++r_exec;
    if (r.seen == Decision::kCancel) ++r_cancel;
    if (r.seen == Decision::kExecute && r.op->load_outcome() == Outcome::kFailed) ++r_failed;
  }
  DS_CHECK(w->recs[2].seen == Decision::kCancel, "gated op of a cancelled slot saw ",
           dname(w->recs[2].seen));
  DS_CHECK(w->recs[3].seen == Decision::kExecute, "op of another slot saw ",
           dname(w->recs[3].seen));
  DS_CHECK(stat(s, "executed") == executed, "executed ", stat(s, "executed"), " vs ", executed,
           " seen");
  DS_CHECK(stat(s, "inflight") == 0, "tokens still in use: ", stat(s, "inflight"));
  DS_CHECK(stat(s, "gated") == 0, "a cancelled op is still parked in the gate (gated=",
           stat(s, "gated"), ")");
  check_slot(s, "r", 3, r_exec - r_failed, r_failed, r_cancel);
  const OpRec& q = w->recs[3];
  const bool q_ok = q.op->load_outcome() == Outcome::kCompleted;
  check_slot(s, "q", 1, q_ok ? 1 : 0, q_ok ? 0 : 1, 0);
  return res;
}

// ------------------------------------------------------------------------------------------------
// 4. gating: progress marks racing schedule of gated ops (and a duplicate mark racing them).

ds::Result scenario_gating(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  Config c = tiny(p, 1 + static_cast<int64_t>(p.below(2)));
  c.num_layers = p.coin() ? 2 : 0;
  auto w = std::make_unique<World>(c);
  const uint64_t reqs[] = {0, layer_requirement(0, 1), layer_requirement(1, 1),
                           iteration_requirement(1), layer_requirement(0, 2)};
  const int n = 4;
  for (int i = 0; i < n; ++i) {
    OpRec r;
    r.rid = "r";
    r.u = U(i);
    r.kind = p.coin() ? Kind::kLoad : Kind::kStore;
    r.req = reqs[p.below(5)];
    r.exec_yields = static_cast<int>(p.below(2));
    w->recs.push_back(r);
  }
  std::vector<int> worder = {0, 1, 2, 3};
  p.shuffle(worder);
  const int racer_delay = static_cast<int>(p.below(40));
  w->s->create_slot("r");
  World& W = *w;
  auto marks_lost = std::make_shared<int>(0);  // layer-0 marks of the main marker that lost
  auto racer_won = std::make_shared<int>(0);
  std::vector<ds::ThreadSpec> ts;
  ts.push_back({"worker", [&W, worder] {
                  for (int i : worder) {
                    OpRec& r = W.recs[i];
                    W.s->enqueue(r.rid, r.u, r.kind, r.mode);
                    r.enqueued = true;
                  }
                }});
  for (int i = 0; i < n; ++i) ts.push_back({cat("transfer", i), [&W, i] { transfer(W, i); }});
  ts.push_back({"progress", [&W, marks_lost] {
                  auto layer0 = [&] {
                    try {
                      W.s->mark_layer_complete(0);
                    } catch (const Error& e) {
                      DS_CHECK(e.code() == ErrorCode::kProtocol, e.what());
                      ++*marks_lost;
                    }
                  };
                  W.s->start_next_iteration();
                  layer0();
                  W.s->mark_layer_complete(1);
                  W.s->mark_iteration_complete();
                  W.s->start_next_iteration();
                  layer0();
                }});
  ts.push_back({"racer", [&W, racer_won, racer_delay] {
                  // S7: concurrent marks of one layer have exactly one winner.
                  ds::yield_points(racer_delay);
                  try {
                    W.s->mark_layer_complete(0);
                    ++*racer_won;
                  } catch (const Error& e) {
                    DS_CHECK(e.code() == ErrorCode::kProtocol, e.what());
                  }
                }});
  opt.invariant = [&W] { common_invariant(W); };
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *w->s;
  check_outcomes(*w);
  check_suspicious(*w);
  DS_CHECK(*marks_lost == *racer_won, "layer-0 marks: racer won ", *racer_won,
           ", main marker lost ", *marks_lost);
  DS_CHECK(s.progress_position() == make_position(2, 1), "final progress ",
           s.progress_position());
  uint64_t ok = 0, failed = 0;
  for (auto& r : w->recs) {
    DS_CHECK(r.seen == Decision::kExecute, r.u.str(), " (req ", r.req, ") saw ", dname(r.seen));
    if (r.op->load_outcome() == Outcome::kCompleted) ++ok;
    if (r.op->load_outcome() == Outcome::kFailed) ++failed;
  }
  DS_CHECK(stat(s, "executed") == n, "executed ", stat(s, "executed"));
  DS_CHECK(stat(s, "gated") == 0 && stat(s, "ready_queued") == 0, "ops left gated/queued");
  DS_CHECK(stat(s, "inflight") == 0, "tokens still in use: ", stat(s, "inflight"));
  check_slot(s, "r", n, ok, failed, 0);
  return res;
}

// ------------------------------------------------------------------------------------------------
// 5. close racing everything.

ds::Result scenario_close(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  Config c = tiny(p, 1);
  auto w = std::make_unique<World>(c);
  const uint64_t reqs[] = {0, 0, layer_requirement(0, 1), layer_requirement(0, 9)};
  const int n = 3;
  for (int i = 0; i < n; ++i) {
    OpRec r;
    r.rid = "r";
    r.u = U(i);
    r.kind = p.coin() ? Kind::kLoad : Kind::kStore;
    r.req = reqs[p.below(4)];
    r.exec_yields = static_cast<int>(p.below(2));
    w->recs.push_back(r);
  }
  std::vector<int> worder = {0, 1, 2};
  p.shuffle(worder);
  const int close_delay = static_cast<int>(p.below(60));
  const bool two_closers = p.coin();
  w->s->create_slot("r");
  World& W = *w;
  std::vector<ds::ThreadSpec> ts;
  ts.push_back({"worker", [&W, worder] {
                  for (int i : worder) {
                    OpRec& r = W.recs[i];
                    try {
                      W.s->enqueue(r.rid, r.u, r.kind, r.mode);
                      r.enqueued = true;
                    } catch (const Error& e) {
                      DS_CHECK(e.code() == ErrorCode::kClosed, e.what());
                    }
                  }
                }});
  for (int i = 0; i < n; ++i)
    ts.push_back({cat("transfer", i), [&W, i] {
                    try {
                      transfer(W, i);
                    } catch (const Error& e) {
                      DS_CHECK(e.code() == ErrorCode::kClosed && !W.recs[i].op, e.what());
                      W.recs[i].schedule_failed = true;
                    }
                  }});
  ts.push_back({"progress", [&W] {
                  try {
                    W.s->start_next_iteration();
                    W.s->mark_layer_complete(0);
                  } catch (const Error& e) {
                    DS_CHECK(e.code() == ErrorCode::kClosed, e.what());
                  }
                }});
  ts.push_back({"poller", [&W] {
                  for (;;) {
                    std::vector<OpPtr> got;
                    try {
                      got = W.s->poll(4, Clock::time_point::max());
                    } catch (const Error& e) {
                      DS_CHECK(e.code() == ErrorCode::kClosed, e.what());
                      return;
                    }
                    if (got.empty()) {
                      DS_CHECK(W.s->closed(), "poll(deadline=max) returned nothing while open");
                      return;
                    }
                    for (auto& op : got) {
                      DS_CHECK(op->load_decision() != Decision::kNone, "poll returned an "
                               "undecided op ", op->uuid.str());
                      // No handle object is made here: give back the view poll() handed over.
                      // (It may fail the op as dropped when the transfer thread does not hold it
                      // yet; the oracles allow for that.)
                      W.s->release_view(op);
                    }
                  }
                }});
  ts.push_back({"closer", [&W, close_delay] {
                  ds::yield_points(close_delay);
                  W.s->close();
                  DS_CHECK(W.s->closed(), "closed() false after close()");
                }});
  if (two_closers) ts.push_back({"closer2", [&W] { W.s->close(); }});
  opt.invariant = [&W] { common_invariant(W); };
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *w->s;
  DS_CHECK(s.closed(), "not closed");
  expect_error(ErrorCode::kClosed, [&] { s.schedule("r", U(99), 0, Mode::kScheduled); },
               "schedule after close");
  expect_error(ErrorCode::kClosed, [&] { s.enqueue("r", U(99), Kind::kLoad, Mode::kScheduled); },
               "enqueue after close");
  // Every handle is decided; executing copies may still report their end after close.
  uint64_t live = 0;
  for (auto& r : w->recs) {
    if (r.enqueued || r.op) ++live;
    if (!r.op) continue;
    const Decision d = r.op->load_decision();
    DS_CHECK(d != Decision::kNone, r.u.str(), " undecided after close (enqueued=", r.enqueued,
             ")");
    if (d == Decision::kExecute && r.op->load_outcome() == Outcome::kOpen) {
      s.mark_complete(r.op, true, "");
      r.marked = true;
      r.mark_ok = true;
    }
    if (r.seen == Decision::kNone) unhold(s, r.op);  // kept by its transfer thread (closed)
  }
  check_outcomes(*w);
  check_suspicious(*w);
  const double ended = stat(s, "completed") + stat(s, "failed") + stat(s, "cancelled");
  DS_CHECK(ended == live, "ops ended ", ended, " != ops created ", live);
  DS_CHECK(stat(s, "inflight") == 0, "tokens still in use: ", stat(s, "inflight"));
  DS_CHECK(stat(s, "gated") == 0, "a cancelled op is still parked in the gate (gated=",
           stat(s, "gated"), ")");
  return res;
}

// ------------------------------------------------------------------------------------------------
// 6. remove + late half + rid reuse, removed_memory 1 or 2.

ds::Result scenario_remove(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  Config c = tiny(p, 1 + static_cast<int64_t>(p.below(2)));
  auto w = std::make_unique<World>(c);
  const size_t rm = c.removed_memory;
  // u0, u1: the first incarnation of r (u1 fails); u2: the second incarnation, its transfer half
  // may arrive before the first is removed.
  for (int i = 0; i < 3; ++i) {
    OpRec r;
    r.rid = "r";
    r.u = U(i);
    r.kind = p.coin() ? Kind::kLoad : Kind::kStore;
    r.mark_ok = i != 1;
    r.exec_yields = static_cast<int>(p.below(2));
    w->recs.push_back(r);
  }
  w->s->create_slot("r");
  World& W = *w;
  auto marks = std::make_shared<Gauge>();
  auto removed = std::make_shared<Gauge>();
  auto late0 = std::make_shared<OpPtr>();
  std::vector<ds::ThreadSpec> ts;
  ts.push_back({"worker", [&W, marks, removed] {
                  W.s->enqueue("r", U(0), W.recs[0].kind, Mode::kScheduled);
                  W.s->enqueue("r", U(1), W.recs[1].kind, Mode::kScheduled);
                  W.recs[0].enqueued = W.recs[1].enqueued = true;
                  marks->wait_at_least(2);
                  // Both marks returned: both ops ended and were counted into the slot.
                  DS_CHECK(W.s->is_complete("r"), "slot not complete after both marks");
                  const SlotSnapshot snap = W.s->slot_status("r");
                  DS_CHECK(snap.expected == 2 && snap.completed + snap.failed == 2 &&
                               snap.cancelled == 0 && snap.errors.size() == snap.failed,
                           "first incarnation counts ", snap.completed, "/", snap.failed, "/",
                           snap.cancelled, " errors ", snap.errors.size());
                  W.s->remove_slot("r");
                  removed->add();
                  W.s->create_slot("r");
                  W.s->enqueue("r", U(2), W.recs[2].kind, Mode::kScheduled);
                  W.recs[2].enqueued = true;
                }});
  for (int i = 0; i < 2; ++i)
    ts.push_back({cat("transfer", i), [&W, i, marks] {
                    transfer(W, i);
                    marks->add();
                  }});
  ts.push_back({"transfer2", [&W] { transfer(W, 2); }});
  ts.push_back({"late", [&W, removed, rm, late0] {
                  removed->wait_at_least(1);
                  // u1 is the newest removed uuid: always remembered, so its late half is
                  // decided CANCEL at once (S6).
                  OpPtr l1 = W.s->schedule("r", U(1), 0, Mode::kScheduled);
                  DS_CHECK(l1->load_decision() == Decision::kCancel &&
                               l1->load_outcome() == Outcome::kCancelled,
                           "late half of a remembered removed uuid: ", dname(l1->load_decision()));
                  // u0 is remembered only with removed_memory >= 2; beyond the bound it is
                  // forgotten and a late half waits like a new one.
                  OpPtr l0 = W.s->schedule("r", U(0), 0, Mode::kScheduled);
                  if (rm >= 2)
                    DS_CHECK(l0->load_decision() == Decision::kCancel,
                             "late half of a remembered removed uuid: ",
                             dname(l0->load_decision()));
                  else
                    DS_CHECK(l0->load_decision() == Decision::kNone,
                             "late half of a forgotten uuid was decided ",
                             dname(l0->load_decision()));
                  *late0 = l0;
                }});
  opt.invariant = [&W] { common_invariant(W); };
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *w->s;
  check_outcomes(*w);
  check_suspicious(*w);
  for (auto& r : w->recs)
    DS_CHECK(r.seen == Decision::kExecute, r.u.str(), " saw ", dname(r.seen));
  const bool ok2 = w->recs[2].op->load_outcome() == Outcome::kCompleted;
  check_slot(s, "r", 1, ok2 ? 1 : 0, ok2 ? 0 : 1, 0);
  DS_CHECK(stat(s, "slots_removed") == 1, "slots_removed ", stat(s, "slots_removed"));
  DS_CHECK(stat(s, "late_cancelled") == (rm >= 2 ? 2 : 1), "late_cancelled ",
           stat(s, "late_cancelled"), " with removed_memory ", rm);
  DS_CHECK(stat(s, "removed_forgotten") == (rm >= 2 ? 0 : 1), "removed_forgotten ",
           stat(s, "removed_forgotten"));
  DS_CHECK(stat(s, "removed_memory_size") == std::min<size_t>(2, rm), "removed_memory_size ",
           stat(s, "removed_memory_size"));
  DS_CHECK(stat(s, "inflight") == 0, "tokens still in use: ", stat(s, "inflight"));
  // The first incarnation was removed before take_finished: only the second is reported.
  const auto fin = s.take_finished();
  DS_CHECK(fin.size() == 1 && fin[0] == "r", "take_finished returned ", fin.size(), " rids");
  s.remove_slot("r");
  DS_CHECK(stat(s, "pending_transfer_halves") == (rm >= 2 ? 0 : 1), "pending halves ",
           stat(s, "pending_transfer_halves"));
  if (rm < 2) {
    // The forgotten uuid's late half waits for a worker half; cancel_slot decides it.
    s.cancel_slot("r");
    DS_CHECK((*late0)->load_decision() == Decision::kCancel, "cancel_slot left the waiting half ",
             dname((*late0)->load_decision()));
    DS_CHECK(stat(s, "pending_transfer_halves") == 0, "pending halves after cancel");
  }
  return res;
}

// ------------------------------------------------------------------------------------------------
// 7. poll-driven executors: every SCHEDULED op with a transfer half reaches poll() exactly once,
//    including ops cancelled while only their worker half existed (Note [poll handshake]).

ds::Result scenario_poll(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  Config c = tiny(p, 1 + static_cast<int64_t>(p.below(2)));
  const int n = 4;
  // No eviction here: a held handle evicted from the backlog is its holder's to wait on, and this
  // scenario's executors only poll (eviction is exercised by the other scenarios).
  c.poll_backlog = n;
  auto w = std::make_unique<World>(c);
  for (int i = 0; i < n; ++i) {
    OpRec r;
    r.rid = "r";
    r.u = U(i);
    r.kind = p.coin() ? Kind::kLoad : Kind::kStore;
    r.req = p.below(3) == 0 ? layer_requirement(0, 1) : 0;
    r.exec_yields = static_cast<int>(p.below(2));
    w->recs.push_back(r);
  }
  std::vector<int> worder = {0, 1, 2, 3}, torder = {0, 1, 2, 3};
  p.shuffle(worder);
  p.shuffle(torder);
  const bool cancel = p.below(3) != 0;
  const int cancel_delay = static_cast<int>(p.below(80));
  // Per op: the transfer thread drops its handle after this many points (-1: keeps it). A drop
  // racing poll() must not fail the op (Note [handle views]: poll hands over a view in transit).
  std::vector<int> drop_after(n);
  for (auto& d : drop_after) d = p.coin() ? static_cast<int>(p.below(12)) : -1;
  w->s->create_slot("r");
  World& W = *w;
  auto polled = std::make_shared<std::vector<const Op*>>();
  std::vector<ds::ThreadSpec> ts;
  ts.push_back({"worker", [&W, worder] {
                  for (int i : worder) {
                    OpRec& r = W.recs[i];
                    W.s->enqueue(r.rid, r.u, r.kind, r.mode);
                    r.enqueued = true;
                  }
                }});
  ts.push_back({"transfer", [&W, torder, drop_after] {
                  std::vector<std::pair<int, OpPtr>> held;  // (points left, handle)
                  auto tick = [&] {
                    for (auto& h : held)
                      if (h.second && h.first-- == 0) {
                        unhold(*W.s, h.second);
                        h.second = nullptr;
                      }
                  };
                  for (int i : torder) {
                    OpRec& r = W.recs[i];
                    OpPtr op = W.s->schedule(r.rid, r.u, r.req, r.mode);
                    hold(op);
                    r.op = op;
                    if (drop_after[i] >= 0) held.push_back({drop_after[i], op});
                    tick();
                  }
                  for (int k = 0; k < 12; ++k) {
                    ds::yield_points(1);
                    tick();
                  }
                }});
  ts.push_back({"progress", [&W] {
                  W.s->start_next_iteration();
                  W.s->mark_layer_complete(0);
                }});
  if (cancel)
    ts.push_back({"cancel", [&W, cancel_delay] {
                    ds::yield_points(cancel_delay);
                    W.s->cancel_slot("r");
                  }});
  for (int e = 0; e < 2; ++e)
    ts.push_back({cat("poller", e), [&W, polled, n] {
                    for (;;) {
                      if (static_cast<int>(polled->size()) == n) return;
                      // A finite deadline only expires at quiescence (DSched's logical clock).
                      auto got = W.s->poll(2, Clock::now() + std::chrono::hours(1));
                      if (got.empty()) {
                        DS_CHECK(static_cast<int>(polled->size()) == n, "quiescent, but only ",
                                 polled->size(), " of ", n, " ops reached poll()");
                        return;
                      }
                      for (auto& op : got) {
                        DS_CHECK(std::find(polled->begin(), polled->end(), op.get()) ==
                                     polled->end(),
                                 "poll returned ", op->uuid.str(), " twice");
                        polled->push_back(op.get());
                        const Decision d = op->load_decision();
                        DS_CHECK(d != Decision::kNone, "poll returned undecided ", op->uuid.str());
                        DS_CHECK(op->halves.load() & Op::kTransferPublished, "poll returned ",
                                 op->uuid.str(), " without its transfer half");
                        const int idx = static_cast<int>(op->uuid.hi - U(0).hi);
                        W.recs[idx].seen = d;
                        // The view poll() handed over is this thread's handle.
                        if (d == Decision::kExecute) execute(W, idx, op);
                        unhold(*W.s, op);
                      }
                    }
                  }});
  opt.invariant = [&W] { common_invariant(W); };
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *w->s;
  check_outcomes(*w);
  check_suspicious(*w);
  uint64_t ok = 0, failed = 0, cancelled = 0;
  for (auto& r : w->recs) {
    DS_CHECK(r.seen != Decision::kNone, r.u.str(), " never polled");
    DS_CHECK(!dropped_op(r) && !r.dropped, r.u.str(), " failed as dropped although the poller "
             "held it from poll() to its mark");
    DS_CHECK(cancel || r.seen == Decision::kExecute, r.u.str(), " saw ", dname(r.seen),
             " without a cancel");
    const Outcome o = r.op->load_outcome();
    ok += o == Outcome::kCompleted;
    failed += o == Outcome::kFailed;
    cancelled += o == Outcome::kCancelled;
  }
  DS_CHECK(stat(s, "inflight") == 0, "tokens still in use: ", stat(s, "inflight"));
  DS_CHECK(stat(s, "gated") == 0, "ops left gated: ", stat(s, "gated"));
  DS_CHECK(stat(s, "poll_backlog") == 0, "poll queue not drained: ", stat(s, "poll_backlog"));
  check_slot(s, "r", n, ok, failed, cancelled);
  return res;
}

// ------------------------------------------------------------------------------------------------
// 0. the harness itself: it must find what it claims to find.

bool selftest() {
  bool ok = true;
  auto expect = [&](bool cond, const char* what) {
    if (!cond) {
      std::printf("FAIL selftest: %s\n", what);
      ok = false;
    }
  };
  size_t dropped_msgs = 0;
  // A lost update (load then store) shows up in some schedules, never with fetch_add.
  int lost = 0, lost_rmw = 0;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    Atomic<int> x{0}, y{0};
    ds::Options o;
    o.seed = seed;
    if (seed % 3 == 2) o.strategy = ds::Strategy::kPct, o.pct_steps = 6;
    auto inc = [&] {
      x.store(x.load() + 1);
      y.fetch_add(1);
    };
    ds::run(o, {{"a", inc}, {"b", inc}});
    lost += x.load() != 2;
    lost_rmw += y.load() != 2;
  }
  expect(lost > 0 && lost < 64, "a load/store race is found in some but not all schedules");
  expect(lost_rmw == 0, "fetch_add never loses an update");
  // Mutual exclusion, with preemption points inside the critical section.
  bool overlap = false;
  for (uint64_t seed = 0; seed < 32; ++seed) {
    Mutex m;
    int inside = 0;
    ds::Options o;
    o.seed = seed;
    auto body = [&] {
      for (int i = 0; i < 3; ++i) {
        std::lock_guard<Mutex> lock(m);
        overlap |= ++inside != 1;
        ds::yield_points(2);
        --inside;
      }
    };
    ds::run(o, {{"a", body}, {"b", body}, {"c", body}});
  }
  expect(!overlap, "Mutex excludes");
  // A lost wakeup (check outside the lock, wait without a predicate) is reported as a deadlock.
  bool found = false;
  for (uint64_t seed = 0; seed < 64 && !found; ++seed) {
    struct S {
      Atomic<bool> flag{false};
      Mutex m;
      CondVar cv;
    };
    auto* st = new S;
    ds::Options o;
    o.seed = seed;
    const ds::Result r =
        ds::run(o, {{"waiter",
                     [st] {
                       if (!st->flag.load()) {
                         std::unique_lock<Mutex> lock(st->m);
                         st->cv.wait(lock);
                       }
                     }},
                    {"notifier", [st] {
                       st->flag.store(true);
                       { std::lock_guard<Mutex> lock(st->m); }
                       st->cv.notify_all();
                     }}});
    const auto msgs = ds::Log::take(&dropped_msgs);
    if (r.abandoned) {
      found = !msgs.empty() && msgs[0].find("deadlock/lost wakeup") != std::string::npos;
      continue;  // `st` is leaked: the waiter is blocked on it for ever
    }
    delete st;
  }
  expect(found, "a lost wakeup is reported as deadlock/lost wakeup");
  // A timed wait expires only at quiescence (logical clock): after the other thread finished.
  for (uint64_t seed = 0; seed < 16; ++seed) {
    Mutex m;
    CondVar cv;
    bool other_done = false, timed_out = false, early = false;
    ds::Options o;
    o.seed = seed;
    o.spurious_wakeup_pm = 0;
    ds::run(o, {{"sleeper",
                 [&] {
                   std::unique_lock<Mutex> lock(m);
                   timed_out = cv.wait_until(lock, Clock::now() + std::chrono::hours(1)) ==
                               std::cv_status::timeout;
                   early |= !other_done;
                 }},
                {"other", [&] {
                   ds::yield_points(20);
                   other_done = true;
                 }}});
    expect(timed_out && !early, "a timed wait times out, and only at quiescence");
  }
  ds::Log::take(&dropped_msgs);
  std::printf("selftest: %s (lost updates found in %d/64 schedules)\n", ok ? "ok" : "FAILED", lost);
  return ok;
}

// ------------------------------------------------------------------------------------------------
// 8. held cancels: the engine aborts a request (cancel_slot) before the worker processed its
//    create_slot, racing the leader's transfer halves and then the worker's create + enqueues.
//    A transfer half that finds the rid cancelled is decided CANCEL at once and held for its
//    worker half; one that comes after create_slot waits and is decided normally (EXECUTE, or
//    CANCEL if cancel_slot lands after create_slot). Either way every op ends once and the slot
//    completes (Dynamo scenario 36).

ds::Result scenario_held(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  Config c = tiny(p, 1 + static_cast<int64_t>(p.below(2)));
  c.removed_memory = 2 + p.below(2);  // >= ops: no held cancel is forgotten in this scenario
  auto w = std::make_unique<World>(c);
  const int n = 2;
  for (int i = 0; i < n; ++i) {
    OpRec r;
    r.rid = "r";
    r.u = U(i);
    r.kind = p.coin() ? Kind::kLoad : Kind::kStore;
    r.exec_yields = static_cast<int>(p.below(2));
    w->recs.push_back(r);
  }
  const bool cancel_first = p.coin();  // cancelled before the run, or racing it
  const int create_delay = static_cast<int>(p.below(12));
  if (cancel_first) w->s->cancel_slot("r");
  World& W = *w;
  std::vector<ds::ThreadSpec> ts;
  ts.push_back({"worker", [&W, create_delay] {
                  ds::yield_points(create_delay);
                  W.s->create_slot("r");
                  for (auto& r : W.recs) {
                    W.s->enqueue(r.rid, r.u, r.kind, r.mode);
                    r.enqueued = true;
                  }
                }});
  for (int i = 0; i < n; ++i) ts.push_back({cat("transfer", i), [&W, i] { transfer(W, i); }});
  if (!cancel_first) ts.push_back({"cancel", [&W] { W.s->cancel_slot("r"); }});
  opt.invariant = [&W] { common_invariant(W); };
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *w->s;
  check_outcomes(*w);
  check_suspicious(*w);
  uint64_t done = 0, failed = 0, cancelled = 0;
  for (auto& r : w->recs) {
    DS_CHECK(r.seen != Decision::kNone, r.u.str(), " undecided");
    if (r.seen == Decision::kCancel) ++cancelled;
    if (r.seen == Decision::kExecute) ++(r.op->load_outcome() == Outcome::kCompleted ? done : failed);
    // A second transfer half of the same uuid is a duplicate whatever happened.
    expect_error(ErrorCode::kDuplicate, [&] { s.schedule("r", r.u, 0, Mode::kScheduled); },
                 "second transfer half");
  }
  check_slot(s, "r", n, done, failed, cancelled);
  DS_CHECK(stat(s, "inflight") == 0, "tokens still in use: ", stat(s, "inflight"));
  s.remove_slot("r");  // joined transfer halves leave the rid registry with their slot
  DS_CHECK(stat(s, "pending_transfer_halves") == 0, "pending halves ",
           stat(s, "pending_transfer_halves"));
  return res;
}

// ------------------------------------------------------------------------------------------------
// 9. watch (asyncio): an event loop registers for the decisions of two ops (Scheduler::watch)
//    while the worker half joins them (EXECUTE, or one waits for the token) and, in some seeds,
//    cancel_slot decides them CANCEL, plus a second loop that tries to watch the same ops (kBusy
//    or kDecided, never a second notifier). No lost wake-up (Note [watch handshake]): every op
//    that watch() reported as watched has its token posted once it is decided.

ds::Result scenario_watch(uint64_t seed, ds::Options opt) {
  Pick p(seed);
  Config c = tiny(p, 1 + static_cast<int64_t>(p.below(2)));
  auto w = std::make_unique<World>(c);
  World& W = *w;
  const int n = 2;
  W.s->create_slot("r");
  std::vector<OpPtr> ops;
  for (int i = 0; i < n; ++i) ops.push_back(W.s->schedule("r", U(i), 0, Mode::kScheduled));
  auto loop_a = std::make_shared<AsyncNotifier>();
  auto loop_b = std::make_shared<AsyncNotifier>();
  std::vector<Scheduler::WatchResult> got_a(n), got_b(n);
  const bool cancel = p.coin();
  std::vector<ds::ThreadSpec> ts;
  const int delay = static_cast<int>(p.below(8));  // spreads the loops' calls over the joins
  ts.push_back({"worker", [&W] {
                  for (int i = 0; i < n; ++i)
                    W.s->enqueue("r", U(i), Kind::kLoad, Mode::kScheduled);
                }});
  ts.push_back({"loop_a", [&W, &ops, &got_a, loop_a, delay] {
                  ds::yield_points(delay);
                  for (int i = 0; i < n; ++i) got_a[i] = W.s->watch(ops[i], loop_a, 1 + i);
                }});
  ts.push_back({"loop_b", [&W, &ops, &got_b, loop_b] {
                  for (int i = n - 1; i >= 0; --i) got_b[i] = W.s->watch(ops[i], loop_b, 1 + i);
                }});
  if (cancel) ts.push_back({"cancel", [&W] { W.s->cancel_slot("r"); }});
  ds::Result res = ds::run(opt, std::move(ts));
  if (res.abandoned) return finish(w, res);

  Scheduler& s = *W.s;
  // An op still waiting for a token (max_inflight 1) is decided when the first one ends.
  for (int round = 0; round < n; ++round)
    for (auto& op : ops)
      if (op->load_decision() == Decision::kExecute && op->load_outcome() == Outcome::kOpen)
        s.mark_complete(op, true, {});
  const std::vector<uint64_t> posted_a = loop_a->drain(), posted_b = loop_b->drain();
  for (int i = 0; i < n; ++i) {
    DS_CHECK(ops[i]->load_decision() != Decision::kNone, "op ", i, " undecided");
    const bool a_watches = got_a[i] == Scheduler::WatchResult::kWatching;
    const bool b_watches = got_b[i] == Scheduler::WatchResult::kWatching;
    DS_CHECK(!(a_watches && b_watches), "op ", i, " watched by two notifiers");
    auto has = [&](const std::vector<uint64_t>& v) {
      return std::find(v.begin(), v.end(), static_cast<uint64_t>(1 + i)) != v.end();
    };
    if (a_watches) DS_CHECK(has(posted_a), "lost wake-up: op ", i, " watched by loop a");
    if (b_watches) DS_CHECK(has(posted_b), "lost wake-up: op ", i, " watched by loop b");
    // The notifier that lost the claim never gets this op's token.
    if (!a_watches && got_a[i] == Scheduler::WatchResult::kBusy)
      DS_CHECK(!has(posted_a), "op ", i, " posted to a notifier that does not watch it");
    if (!b_watches && got_b[i] == Scheduler::WatchResult::kBusy)
      DS_CHECK(!has(posted_b), "op ", i, " posted to a notifier that does not watch it");
  }
  DS_CHECK(s.is_complete("r"), "slot not complete");
  return res;
}

// ------------------------------------------------------------------------------------------------
// driver

struct Entry {
  const char* name;
  Scenario fn;
  uint64_t pct_steps;  // rough steps of one run (PCT draws its change points in [1, pct_steps])
};

const Entry kScenarios[] = {
    {"join", scenario_join, 210},     {"tokens", scenario_tokens, 310},
    {"cancel", scenario_cancel, 310}, {"gating", scenario_gating, 410},
    {"close", scenario_close, 370},   {"remove", scenario_remove, 350},
    {"poll", scenario_poll, 330},     {"held", scenario_held, 200},
    {"watch", scenario_watch, 90},
};

ds::Options options_for(uint64_t seed, const Entry& e) {
  ds::Options o;
  o.seed = seed;
  // Two seeds in three: uniform random at every point. One in three: PCT with 0, 1 or 2
  // preemptions (depth 1-3).
  if (seed % 3 == 2) {
    o.strategy = ds::Strategy::kPct;
    o.pct_depth = 1 + static_cast<int>((seed / 3) % 3);
    o.pct_steps = e.pct_steps;
  }
  const char* t = std::getenv("DSCHED_TRACE");
  o.trace = t && *t && std::strcmp(t, "0") != 0;
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t seeds = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 300;
  const uint64_t first = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 0;
  const char* only = argc > 3 ? argv[3] : nullptr;
  const char* rc = std::getenv("DSCHED_REPLAY_CHECK");
  const bool replay_check = rc && *rc && std::strcmp(rc, "0") != 0;
  int failed_scenarios = 0;
  const auto t_all = std::chrono::steady_clock::now();
  if (!only || std::strcmp(only, "selftest") == 0) {
    if (!selftest()) ++failed_scenarios;
  }
  for (const Entry& e : kScenarios) {
    if (only && std::strcmp(only, e.name) != 0) continue;
    const auto t0 = std::chrono::steady_clock::now();
    uint64_t steps = 0, switches = 0, jumps = 0, failures = 0, abandoned = 0, ran = 0;
    uint64_t aux_skipped = 0;
    g_dropped_ops = 0;
    for (uint64_t seed = first; seed < first + seeds; ++seed) {
      reset_alloc_order();
      const ds::Result r = e.fn(seed, options_for(seed, e));
      ++ran;
      steps += r.steps;
      switches += r.switches;
      jumps += r.time_jumps;
      aux_skipped += r.aux_skipped;
      size_t total = 0;
      std::vector<std::string> msgs = ds::Log::take(&total);
      if (replay_check && !r.abandoned && total == 0) {
        reset_alloc_order();
        const ds::Result again = e.fn(seed, options_for(seed, e));
        size_t t2 = 0;
        ds::Log::take(&t2);
        if (again.steps != r.steps || again.trace_hash != r.trace_hash)
          msgs.push_back(cat("replay diverged: steps ", r.steps, " vs ", again.steps));
        total += msgs.empty() ? 0 : 1;
      }
      if (total == 0) continue;
      ++failures;
      if (r.abandoned) ++abandoned;
      std::printf("FAIL %s seed %llu (%s, %llu steps): %zu failure(s)\n", e.name,
                  static_cast<unsigned long long>(seed),
                  seed % 3 == 2 ? "pct" : "uniform", static_cast<unsigned long long>(r.steps),
                  total);
      for (size_t i = 0; i < msgs.size() && i < 6; ++i) std::printf("  %s\n", msgs[i].c_str());
      std::printf("  replay: test_dsched 1 %llu %s   (DSCHED_TRACE=1 prints every step)\n",
                  static_cast<unsigned long long>(seed), e.name);
      std::fflush(stdout);
      if (abandoned >= 4) {
        // Each abandoned run leaves its threads blocked; stop before piling them up.
        std::printf("  %s: stopping after %llu abandoned runs\n", e.name,
                    static_cast<unsigned long long>(abandoned));
        break;
      }
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%-7s seeds %llu..%llu: %llu runs, %llu steps (%llu switches, %llu timed-out "
                "waits, %llu invariant checks skipped, %llu ops dropped from the backlog), "
                "%llu failing seeds, %.2f s\n",
                e.name, static_cast<unsigned long long>(first),
                static_cast<unsigned long long>(first + seeds - 1),
                static_cast<unsigned long long>(ran), static_cast<unsigned long long>(steps),
                static_cast<unsigned long long>(switches), static_cast<unsigned long long>(jumps),
                static_cast<unsigned long long>(aux_skipped),
                static_cast<unsigned long long>(g_dropped_ops),
                static_cast<unsigned long long>(failures), secs);
    std::fflush(stdout);
    if (failures) ++failed_scenarios;
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_all).count();
  std::printf("%s: %d scenario(s) failed, %.2f s\n", failed_scenarios ? "FAILED" : "OK",
              failed_scenarios, secs);
  return failed_scenarios ? 1 : 0;
}
