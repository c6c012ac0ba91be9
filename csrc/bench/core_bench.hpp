// The core benchmark loop, shared by the `bench_core` binary and the
// `kvsched._core._bench_core` entry point used by kvsched-bench (no Python in the loop).
//
// One "op" is the whole life of one operation: enqueue + schedule (decided EXECUTE at once) +
// mark_complete, with create_slot/remove_slot amortised over 4 operations per slot.
#pragma once

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/scheduler.hpp"

namespace kvsched::bench {

struct CoreBenchResult {
  long ops = 0;
  double seconds = 0;
};

// `threads` threads share one Scheduler, each with its own requests and uuids, started together;
// `ops` is the total over all threads. With 1 thread this is the loop kvsched-bench reports as
// "core alone"; more threads measure how the core's locks and atomics scale (no Python anywhere).
inline CoreBenchResult run_core_bench(long ops, int threads = 1) {
  using namespace kvsched::core;
  constexpr int kPerSlot = 4;
  if (threads < 1) threads = 1;
  Config c;
  c.max_inflight = 64;
  Scheduler s(c);
  std::vector<std::vector<std::string>> rids(threads);
  for (int t = 0; t < threads; ++t)
    for (int i = 0; i < 1024; ++i) rids[t].push_back("req-" + std::to_string(t) + "-" + std::to_string(i));
  auto run = [&](int t, long n, uint64_t base) {
    for (long i = 0; i < n; i += kPerSlot) {
      const std::string& rid = rids[t][(i / kPerSlot) % rids[t].size()];
      s.create_slot(rid);
      OpPtr h[kPerSlot];
      for (int j = 0; j < kPerSlot; ++j) {
        Uuid u{base, static_cast<uint64_t>(i + j)};
        s.enqueue(rid, u, j % 2 ? Kind::kStore : Kind::kLoad, Mode::kScheduled);
        h[j] = s.schedule(rid, u, 0, Mode::kScheduled);
        s.deliver(h[j]);
      }
      for (int j = 0; j < kPerSlot; ++j) s.mark_complete(h[j], true, "");
      s.remove_slot(rid);
      if ((i / kPerSlot) % 64 == 0) s.take_finished();
    }
  };
  auto timed = [&](long total, uint64_t base) {
    const long each = (total / threads + kPerSlot - 1) / kPerSlot * kPerSlot;
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        // order: relaxed/acquire — a start line: `go` (release below) publishes nothing but the
        // moment to start; each thread touches only its own rids and uuids.
        ready.fetch_add(1, std::memory_order_relaxed);
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        run(t, each, base + static_cast<uint64_t>(t) * 0x100000000ull);
      });
    while (ready.load(std::memory_order_relaxed) < threads) std::this_thread::yield();
    auto t0 = std::chrono::steady_clock::now();
    go.store(true, std::memory_order_release);
    for (auto& th : pool) th.join();
    return std::make_pair(each * threads,
                          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  };
  if (threads == 1) {  // no thread start in the timed part
    run(0, ops / 10 + kPerSlot, 1);  // warm-up: allocator, hash tables, removed-uuid memory
    const long done = (ops + kPerSlot - 1) / kPerSlot * kPerSlot;  // whole slots
    auto t0 = std::chrono::steady_clock::now();
    run(0, done, 2);
    return {done, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
  }
  timed(ops / 10 + kPerSlot * threads, 1);
  auto [done, seconds] = timed(ops, 2);
  return {done, seconds};
}

}  // namespace kvsched::bench
