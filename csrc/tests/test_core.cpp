// C++ tests of the core: `test_core unit` (every rule once, single thread) and
// `test_core stress [seed] [threads] [ops]` (seeded many-thread run with exact final counts;
// replay a failure with the seed it prints). Built plain, with TSan and with ASan+UBSan.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <set>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "core/removed_uuids.hpp"
#include "core/scheduler.hpp"

using namespace kvsched::core;

namespace {

Uuid U(uint64_t i) { return Uuid{0x1234, i}; }
const auto kSoon = [] { return Clock::now() + std::chrono::milliseconds(2000); };

void unit_join_both_orders() {
  Scheduler s(Config{});
  s.create_slot("r");
  s.enqueue("r", U(1), Kind::kLoad, Mode::kScheduled);  // worker first
  auto a = s.schedule("r", U(1), 0, Mode::kScheduled);
  CHECK(a->load_decision() == Decision::kExecute);
  auto b = s.schedule("r", U(2), 0, Mode::kScheduled);  // transfer first
  CHECK(b->load_decision() == Decision::kNone);
  s.enqueue("r", U(2), Kind::kStore, Mode::kScheduled);
  CHECK(b->load_decision() == Decision::kExecute);
  CHECK(!s.is_complete("r"));
  s.mark_complete(a, true, "");
  s.mark_complete(b, false, "disk full");
  CHECK(s.is_complete("r"));
  auto st = s.slot_status("r");
  CHECK(st.expected == 2 && st.completed == 1 && st.failed == 1 && st.errors.size() == 1);
  CHECK_THROWS(ErrorCode::kProtocol, s.mark_complete(a, true, ""));
  CHECK(s.slot_status("r").completed == 1);
  CHECK(s.take_finished() == std::vector<std::string>{"r"});
  CHECK(s.take_finished().empty());
  CHECK_THROWS(ErrorCode::kDuplicate, s.enqueue("r", U(1), Kind::kLoad, Mode::kScheduled));
  CHECK_THROWS(ErrorCode::kDuplicate, s.schedule("r", U(1), 0, Mode::kScheduled));
  CHECK_THROWS(ErrorCode::kDuplicate, s.schedule("other", U(1), 0, Mode::kScheduled));
  s.remove_slot("r");
  // Late transfer half after remove: CANCEL at once.
  auto late = s.schedule("r", U(1), 0, Mode::kScheduled);
  CHECK(late->load_decision() == Decision::kCancel);
}

void unit_gating_and_progress() {
  Config c;
  c.num_layers = 3;
  Scheduler s(c);
  s.create_slot("r");
  CHECK_THROWS(ErrorCode::kProtocol, s.mark_layer_complete(0));
  CHECK(s.start_next_iteration() == 1);
  s.enqueue("r", U(1), Kind::kStore, Mode::kScheduled);
  auto h = s.schedule("r", U(1), layer_requirement(1, 1), Mode::kScheduled);
  CHECK(h->load_decision() == Decision::kNone);
  s.mark_layer_complete(0);
  CHECK(h->load_decision() == Decision::kNone);
  CHECK_THROWS(ErrorCode::kProtocol, s.mark_layer_complete(0));  // repeated
  CHECK_THROWS(ErrorCode::kProtocol, s.mark_layer_complete(2));  // skipped
  s.mark_layer_complete(1);
  CHECK(h->load_decision() == Decision::kExecute);
  CHECK_THROWS(ErrorCode::kProtocol, s.mark_layer_complete(3));  // out of range
  // Iteration complete satisfies every layer of it (engines whose hooks skip layers).
  s.enqueue("r", U(2), Kind::kStore, Mode::kScheduled);
  auto g = s.schedule("r", U(2), layer_requirement(2, 1), Mode::kScheduled);
  CHECK(g->load_decision() == Decision::kNone);
  s.mark_iteration_complete();
  CHECK(g->load_decision() == Decision::kExecute);
  // Requirement already satisfied at join.
  s.enqueue("r", U(3), Kind::kLoad, Mode::kScheduled);
  CHECK(s.schedule("r", U(3), iteration_requirement(1), Mode::kScheduled)->load_decision() ==
        Decision::kExecute);
}

void unit_tokens_priority() {
  Config c;
  c.max_inflight = 1;
  c.store_starvation_ns = int64_t{1} << 60;
  Scheduler s(c);
  s.create_slot("r");
  std::vector<OpPtr> h;
  // op 1 takes the token; then store 2, load 3 (later requirement), load 4 queue.
  s.enqueue("r", U(1), Kind::kLoad, Mode::kScheduled);
  h.push_back(s.schedule("r", U(1), 0, Mode::kScheduled));
  s.start_next_iteration();
  s.mark_layer_complete(0);
  s.mark_layer_complete(1);
  for (auto [i, k, req] : {std::tuple{2, Kind::kStore, layer_requirement(0, 1)},
                           std::tuple{3, Kind::kLoad, layer_requirement(1, 1)},
                           std::tuple{4, Kind::kLoad, layer_requirement(0, 1)}}) {
    s.enqueue("r", U(i), k, Mode::kScheduled);
    h.push_back(s.schedule("r", U(i), req, Mode::kScheduled));
  }
  CHECK(h[0]->load_decision() == Decision::kExecute);
  for (int i = 1; i < 4; ++i) CHECK(h[i]->load_decision() == Decision::kNone);
  s.mark_complete(h[0], true, "");
  CHECK(h[3]->load_decision() == Decision::kExecute);  // load, earlier requirement
  s.mark_complete(h[3], true, "");
  CHECK(h[2]->load_decision() == Decision::kExecute);  // load
  s.mark_complete(h[2], true, "");
  CHECK(h[1]->load_decision() == Decision::kExecute);  // store last
  s.mark_complete(h[1], true, "");
  CHECK(s.is_complete("r"));
}

void unit_cancel_remove_reuse() {
  Scheduler s(Config{});
  s.create_slot("r");
  s.enqueue("r", U(1), Kind::kLoad, Mode::kScheduled);
  auto exec = s.schedule("r", U(1), 0, Mode::kScheduled);
  s.enqueue("r", U(2), Kind::kLoad, Mode::kScheduled);  // undecided: transfer half missing
  auto gated = s.schedule("r", U(3), iteration_requirement(5), Mode::kScheduled);
  s.enqueue("r", U(3), Kind::kStore, Mode::kScheduled);
  s.cancel_slot("r");
  CHECK(exec->load_decision() == Decision::kExecute);
  CHECK(gated->load_decision() == Decision::kCancel);
  CHECK(!s.is_complete("r"));  // executing op runs to its end
  CHECK_THROWS(ErrorCode::kSlotBusy, s.remove_slot("r"));
  auto late = s.schedule("r", U(2), 0, Mode::kScheduled);
  CHECK(late->load_decision() == Decision::kCancel);
  auto unknown = s.schedule("r", U(9), 0, Mode::kScheduled);  // rid cancelled
  CHECK(unknown->load_decision() == Decision::kCancel);
  s.mark_complete(exec, true, "");
  CHECK(s.is_complete("r"));
  auto st = s.slot_status("r");
  CHECK(st.completed == 1 && st.cancelled == 2);
  s.remove_slot("r");
  CHECK_THROWS(ErrorCode::kUnknownSlot, s.is_complete("r"));
  // Reuse: starts clean.
  auto t_first = s.schedule("r", U(20), 0, Mode::kScheduled);  // before re-creation: rid still cancelled
  CHECK(t_first->load_decision() == Decision::kCancel);
  s.create_slot("r");
  auto t2 = s.schedule("r", U(21), 0, Mode::kScheduled);
  CHECK(t2->load_decision() == Decision::kNone);
  s.enqueue("r", U(21), Kind::kLoad, Mode::kScheduled);
  CHECK(t2->load_decision() == Decision::kExecute);
  st = s.slot_status("r");
  CHECK(st.expected == 1 && st.completed == 0 && st.cancelled == 0 && st.errors.empty());
  // Zero-op slot.
  s.create_slot("z");
  CHECK(s.is_complete("z"));
}

// The removed-uuid memory against a plain model (FIFO deque + set), with capacities from 0 to
// beyond the table's first size, a small uuid pool (re-adds, collisions in a 16-slot table) and
// many random orders: backward-shift deletion must never lose or invent a member.
void unit_removed_uuids() {
  std::mt19937_64 rng(7);
  // (capacity, distinct uuids drawn from): small pools collide and re-add often; the large ones
  // grow the table through several rehashes.
  struct Case { size_t cap; uint64_t pool_lo; };
  for (Case cs : {Case{0, 64}, Case{1, 64}, Case{2, 64}, Case{3, 64}, Case{7, 64}, Case{8, 64},
                  Case{9, 64}, Case{31, 64}, Case{100, 64}, Case{1000, 2048}, Case{5000, 4096}}) {
    const size_t cap = cs.cap;
    RemovedUuids set(cap);
    std::deque<Uuid> order;
    std::set<std::pair<uint64_t, uint64_t>> members;
    for (int step = 0; step < 20000; ++step) {
      const Uuid u{rng() % 3, rng() % cs.pool_lo};
      const bool had = members.count({u.hi, u.lo}) != 0;
      CHECK(set.contains(u) == had);
      size_t forgotten_model = cap == 0 ? 1 : 0;  // capacity 0: forgotten at once
      if (cap > 0 && !had) {
        order.push_back(u);
        members.insert({u.hi, u.lo});
        if (order.size() > cap) {
          members.erase({order.front().hi, order.front().lo});
          order.pop_front();
          forgotten_model = 1;
        }
      }
      CHECK(set.add(u) == forgotten_model);
      CHECK(set.size() == order.size());
      if (kvsched::test::failures()) return;  // a broken table can loop for ever once corrupt
    }
    for (uint64_t hi = 0; hi < 3; ++hi)
      for (uint64_t lo = 0; lo < cs.pool_lo; ++lo)
        CHECK(set.contains(Uuid{hi, lo}) == (members.count({hi, lo}) != 0));
  }
}

// Regressions found by tests/model (tests/model/test_regressions.py has the Python side).
void unit_held_cancel_and_rid_memory() {
  Config c;
  c.removed_memory = 2;
  Scheduler s(c);
  // A transfer half for a rid cancelled before its slot exists is CANCEL at once and held: the
  // worker half of a later slot joins it and counts it cancelled; a second one is a duplicate.
  s.cancel_slot("a");
  auto held = s.schedule("a", U(1), 0, Mode::kScheduled);
  CHECK(held->load_decision() == Decision::kCancel);
  CHECK_THROWS(ErrorCode::kDuplicate, s.schedule("a", U(1), 0, Mode::kScheduled));
  s.create_slot("a");
  s.enqueue("a", U(1), Kind::kLoad, Mode::kScheduled);
  CHECK(s.is_complete("a"));
  auto st = s.slot_status("a");
  CHECK(st.expected == 1 && st.cancelled == 1);
  // create_slot unlinks the rid from the cancelled-rid memory (it used to leave a stale entry
  // that counted against removed_memory): b, a cancelled, b re-created -> {a}; c -> {a, c};
  // d -> {c, d}, so c is still remembered.
  s.cancel_slot("b");
  s.cancel_slot("a");
  s.create_slot("b");
  s.cancel_slot("c");
  s.cancel_slot("d");  // memory 2: {c, d} now; a was the least recent
  CHECK(s.schedule("c", U(2), 0, Mode::kScheduled)->load_decision() == Decision::kCancel);
  // Re-cancelling refreshes: e, f, e, g -> e and g remembered.
  s.cancel_slot("e");
  s.cancel_slot("f");
  s.cancel_slot("e");
  s.cancel_slot("g");
  CHECK(s.schedule("e", U(3), 0, Mode::kScheduled)->load_decision() == Decision::kCancel);
  CHECK(s.schedule("f", U(4), 0, Mode::kScheduled)->load_decision() == Decision::kNone);
}

void unit_mark_is_delivery_and_close_drops() {
  Scheduler s(Config{});
  s.create_slot("r");
  auto h = s.schedule("r", U(1), 0, Mode::kScheduled);
  s.enqueue("r", U(1), Kind::kLoad, Mode::kScheduled);
  CHECK(h->load_decision() == Decision::kExecute);
  s.mark_complete(h, true, "");
  auto far = Clock::now() + std::chrono::milliseconds(1);
  auto got = s.poll(8, far);
  CHECK(got.empty());  // marked: delivered, never handed out again
  // An undelivered EXECUTE op nobody holds is failed as dropped by close(): no token is kept.
  auto h2 = s.schedule("r", U(2), 0, Mode::kScheduled);
  s.enqueue("r", U(2), Kind::kLoad, Mode::kScheduled);
  CHECK(h2->load_decision() == Decision::kExecute);
  s.close();
  CHECK(h2->load_outcome() == Outcome::kFailed);
}

void unit_immediate_held() {
  Scheduler s(Config{});
  auto h = s.schedule("r", U(1), 0, Mode::kImmediate);  // before the slot exists
  CHECK(h->load_decision() == Decision::kExecute);
  s.mark_complete(h, false, "io error");  // outcome held
  s.create_slot("r");
  CHECK(s.is_complete("r"));
  s.enqueue("r", U(1), Kind::kLoad, Mode::kImmediate);
  CHECK(s.is_complete("r"));
  CHECK(s.slot_status("r").failed == 1);
  // A foreign uuid's outcome never completes the slot.
  s.enqueue("r", U(2), Kind::kLoad, Mode::kImmediate);
  auto stray = s.schedule("r", U(3), 0, Mode::kImmediate);
  s.mark_complete(stray, true, "");
  CHECK(!s.is_complete("r"));
  CHECK_THROWS(ErrorCode::kProtocol, s.schedule("r", U(2), 0, Mode::kScheduled));  // mode mismatch
}

void unit_close_and_timeout() {
  Config c;
  c.op_timeout_ns = 50'000'000;
  Scheduler s(c);
  s.create_slot("r");
  s.enqueue("r", U(1), Kind::kLoad, Mode::kScheduled);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto st = s.slot_status("r");
  CHECK(st.cancelled == 1 && st.errors.size() == 1);
  CHECK(st.errors.size() == 1 && st.errors[0].second.find("timed out") != std::string::npos);
  auto h = s.schedule("r", U(2), 0, Mode::kScheduled);
  std::thread waiter([&] { CHECK(s.wait_decision(h, kSoon()) == Decision::kCancel); });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  s.close();
  waiter.join();
  CHECK_THROWS(ErrorCode::kClosed, s.create_slot("x"));
  s.close();  // idempotent
}

// Robustness round 2: batches are all or nothing, held halves are bounded, the copy claim.
void unit_batches_held_and_claims() {
  Config c;
  c.removed_memory = 3;
  Scheduler s(c);
  s.create_slot("r");
  s.enqueue("r", U(900), Kind::kLoad, Mode::kScheduled);
  // A duplicate inside the batch, or of an earlier half, refuses the whole batch.
  CHECK_THROWS(ErrorCode::kDuplicate, s.enqueue_many("r", {U(901), U(902), U(901)}, Kind::kLoad,
                                                     Mode::kScheduled));
  CHECK_THROWS(ErrorCode::kDuplicate,
               s.enqueue_many("r", {U(901), U(902), U(900)}, Kind::kLoad, Mode::kScheduled));
  CHECK(s.slot_status("r").expected == 1);
  s.schedule("other", U(950), 0, Mode::kScheduled);
  CHECK_THROWS(ErrorCode::kDuplicate,
               s.schedule_many("r", {U(900), U(950)}, 0, Mode::kScheduled));
  CHECK_THROWS(ErrorCode::kProtocol,
               s.schedule_many("r", {U(900)}, 0, Mode::kImmediate));  // halves disagree
  CHECK(s.slot_status("r").expected == 1);
  auto hs = s.schedule_many("r", {U(900)}, 0, Mode::kScheduled);
  CHECK(hs.size() == 1 && hs[0]->load_decision() == Decision::kExecute);
  // The copy claim: one engine, only while open; the caller cannot mark meanwhile.
  s.claim_transfer(hs[0]);
  CHECK_THROWS(ErrorCode::kProtocol, s.claim_transfer(hs[0]));
  CHECK_THROWS(ErrorCode::kProtocol, s.mark_complete(hs[0], true, {}));
  s.mark_complete(hs[0], true, {}, /*by_engine=*/true);
  CHECK_THROWS(ErrorCode::kProtocol, s.claim_transfer(hs[0]));  // ended: nothing copies again
  // Transfer halves of requests that never get a slot, cancelled: held, at most removed_memory.
  for (uint64_t i = 0; i < 10; ++i) {
    const std::string rid = "ghost" + std::to_string(i);
    s.schedule(rid, U(1000 + i), 0, Mode::kScheduled);
    s.cancel_slot(rid);
  }
  double pending = -1, held = -1, forgotten = -1;
  for (auto& kv : s.stats()) {
    if (kv.first == "pending_transfer_halves") pending = kv.second;
    if (kv.first == "held_cancels") held = kv.second;
    if (kv.first == "held_forgotten") forgotten = kv.second;
  }
  CHECK(pending == 1 && held == 3 && forgotten == 7);  // pending: "other"'s half
}

// Batches on overlapping uuids from several threads: no deadlock between their shard locks, and
// every uuid is applied at most once, in whole batches only (run under TSan in CI).
void unit_batches_from_threads() {
  Config c;
  c.max_inflight = 1 << 20;
  c.join_shards = 4;
  Scheduler s(c);
  s.create_slot("r");
  std::atomic<int> applied{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      for (int i = 0; i < 300; ++i) {
        std::vector<Uuid> batch;
        std::set<uint64_t> seen;
        while (batch.size() < 4) {
          const uint64_t k = rng() % 200;
          if (seen.insert(k).second) batch.push_back(U(5000 + k));
        }
        try {
          if (t % 2) {
            s.enqueue_many("r", batch, Kind::kLoad, Mode::kScheduled);
          } else {
            for (auto& op : s.schedule_many("r", batch, 0, Mode::kScheduled)) (void)op;
          }
          applied.fetch_add(4, std::memory_order_relaxed);
        } catch (const Error& e) {
          CHECK(e.code() == ErrorCode::kDuplicate);
        }
      }
    });
  for (auto& th : threads) th.join();
  // Each uuid enqueued at most once: expected counts whole applied enqueue batches only.
  CHECK(s.slot_status("r").expected % 4 == 0);
  s.close();
}

int run_unit() {
  unit_join_both_orders();
  unit_gating_and_progress();
  unit_tokens_priority();
  unit_cancel_remove_reuse();
  unit_immediate_held();
  unit_close_and_timeout();
  unit_held_cancel_and_rid_memory();
  unit_removed_uuids();
  unit_mark_is_delivery_and_close_drops();
  unit_batches_held_and_claims();
  unit_batches_from_threads();
  return kvsched::test::failures();
}

// Many threads: each request gets a worker thread and a transfer thread racing both halves,
// executors mark, a canceller cancels some rids. Final counts must be exact.
int run_stress(uint64_t seed, int threads, int ops_per_thread) {
  Config c;
  c.max_inflight = 4;
  Scheduler s(c);
  std::atomic<int64_t> executing{0};
  std::atomic<int64_t> max_seen{0};
  std::atomic<uint64_t> executed{0}, cancelled{0};
  const int pairs = threads / 2;
  std::vector<std::thread> ts;
  for (int p = 0; p < pairs; ++p) {
    const std::string rid = "r" + std::to_string(p);
    s.create_slot(rid);
    ts.emplace_back([&, p, rid] {  // worker side
      std::mt19937_64 rng(seed * 7919 + p);
      for (int i = 0; i < ops_per_thread; ++i) {
        s.enqueue(rid, Uuid{static_cast<uint64_t>(p) + 1, static_cast<uint64_t>(i)},
                  (rng() & 1) ? Kind::kLoad : Kind::kStore, Mode::kScheduled);
        if ((rng() & 63) == 0) std::this_thread::yield();
      }
    });
    ts.emplace_back([&, p, rid] {  // transfer side: schedules, never waits
      std::mt19937_64 rng(seed * 104729 + p);
      for (int i = 0; i < ops_per_thread; ++i) {
        s.schedule(rid, Uuid{static_cast<uint64_t>(p) + 1, static_cast<uint64_t>(i)}, 0,
                   Mode::kScheduled);
        if (p == 0 && i == ops_per_thread / 2) s.cancel_slot(rid);  // cancel racing schedule
        if ((rng() & 63) == 0) std::this_thread::yield();
      }
    });
  }
  // Executors take decided ops through poll() and mark them; they stop when every op is seen.
  const uint64_t total = static_cast<uint64_t>(pairs) * ops_per_thread;
  std::atomic<uint64_t> seen{0};
  for (int e = 0; e < 2; ++e) {
    ts.emplace_back([&] {
      const auto give_up = Clock::now() + std::chrono::seconds(60);
      while (seen.load() < total && Clock::now() < give_up) {
        for (auto& op : s.poll(16, Clock::now() + std::chrono::milliseconds(20))) {
          if (op->load_decision() == Decision::kExecute) {
            int64_t now = executing.fetch_add(1) + 1;
            int64_t m = max_seen.load();
            while (now > m && !max_seen.compare_exchange_weak(m, now)) {
            }
            executing.fetch_sub(1);
            executed.fetch_add(1);
            s.mark_complete(op, true, "");
          } else {
            CHECK(op->load_decision() == Decision::kCancel);
            cancelled.fetch_add(1);
          }
          CHECK(!s.release_view(op));  // marked or cancelled: giving the view back drops nothing
          seen.fetch_add(1);
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  if (seen.load() != total) std::fprintf(stderr, "seen %llu of %llu\n", (unsigned long long)seen.load(), (unsigned long long)total);
  CHECK(seen.load() == total);
  uint64_t total_completed = 0, total_cancelled = 0;
  for (int p = 0; p < pairs; ++p) {
    const std::string rid = "r" + std::to_string(p);
    CHECK(s.is_complete(rid));
    auto st = s.slot_status(rid);
    CHECK(st.expected == static_cast<uint64_t>(ops_per_thread));
    CHECK(st.completed + st.failed + st.cancelled == st.expected);
    total_completed += st.completed;
    total_cancelled += st.cancelled;
  }
  CHECK(total_completed == executed.load());
  CHECK(total_cancelled == cancelled.load());
  CHECK(max_seen.load() <= c.max_inflight);
  for (auto& kv : s.stats()) {
    if (kv.first == "peak_inflight") CHECK(kv.second <= c.max_inflight);
    if (kv.first == "inflight") CHECK(kv.second == 0);
  }
  if (kvsched::test::failures())
    std::fprintf(stderr, "stress failed: replay with `test_core stress %llu %d %d`\n",
                 static_cast<unsigned long long>(seed), threads, ops_per_thread);
  return kvsched::test::failures();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "unit";
  if (mode == "unit") {
    int f = run_unit();
    std::printf("unit: %s\n", f ? "FAILED" : "ok");
    return f ? 1 : 0;
  }
  if (mode == "stress") {
    const char* env = std::getenv("KVSCHED_STRESS");
    const bool longer = env && std::strcmp(env, "long") == 0;
    int threads = argc > 3 ? std::atoi(argv[3]) : 8;
    int ops = argc > 4 ? std::atoi(argv[4]) : (longer ? 20000 : 2000);
    uint64_t first = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
    int seeds = argc > 2 ? 1 : (longer ? 50 : 5);
    for (int i = 0; i < seeds; ++i) {
      if (run_stress(first + i, threads, ops)) return 1;
    }
    std::printf("stress: %d seeds x %d threads x %d ops: ok\n", seeds, threads, ops);
    return 0;
  }
  std::fprintf(stderr, "usage: test_core unit | stress [seed] [threads] [ops]\n");
  return 2;
}
