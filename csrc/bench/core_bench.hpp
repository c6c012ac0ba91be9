// The single-thread core benchmark loop, shared by the `bench_core` binary and the
// `kvsched._core._bench_core` entry point used by kvsched-bench (no Python in the loop).
//
// One "op" is the whole life of one operation: enqueue + schedule (decided EXECUTE at once) +
// mark_complete, with create_slot/remove_slot amortised over 4 operations per slot.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "core/scheduler.hpp"

namespace kvsched::bench {

struct CoreBenchResult {
  long ops = 0;
  double seconds = 0;
};

inline CoreBenchResult run_core_bench(long ops) {
  using namespace kvsched::core;
  constexpr int kPerSlot = 4;
  Config c;
  c.max_inflight = 64;
  Scheduler s(c);
  std::vector<std::string> rids;
  for (int i = 0; i < 1024; ++i) rids.push_back("req-" + std::to_string(i));
  auto run = [&](long n, uint64_t base) {
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; i += kPerSlot) {
      const std::string& rid = rids[(i / kPerSlot) % rids.size()];
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
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  run(ops / 10 + kPerSlot, 1);  // warm-up: allocator, hash tables, removed-uuid memory
  CoreBenchResult r;
  r.ops = ops;
  r.seconds = run(ops, 2);
  return r;
}

}  // namespace kvsched::bench
