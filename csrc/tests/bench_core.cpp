// Throughput of the C++ core alone, one thread, no Python: `bench_core [ops]`.
// One "op" is the whole life of one operation: enqueue + schedule (decided EXECUTE at once) +
// mark_complete, with create_slot/remove_slot amortised over 4 operations per slot (as a request
// with a few block groups would). Prints JSON.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/scheduler.hpp"

using namespace kvsched::core;

int main(int argc, char** argv) {
  const long ops = argc > 1 ? std::atol(argv[1]) : 2'000'000;
  const int per_slot = 4;
  Config c;
  c.max_inflight = 64;
  Scheduler s(c);
  std::vector<std::string> rids;
  for (int i = 0; i < 1024; ++i) rids.push_back("req-" + std::to_string(i));
  // Warm-up, then the timed run.
  auto run = [&](long n, uint64_t base) {
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; i += per_slot) {
      const std::string& rid = rids[(i / per_slot) % rids.size()];
      s.create_slot(rid);
      OpPtr h[per_slot];
      for (int j = 0; j < per_slot; ++j) {
        Uuid u{base, static_cast<uint64_t>(i + j)};
        s.enqueue(rid, u, j % 2 ? Kind::kStore : Kind::kLoad, Mode::kScheduled);
        h[j] = s.schedule(rid, u, 0, Mode::kScheduled);
        s.deliver(h[j]);
      }
      for (int j = 0; j < per_slot; ++j) s.mark_complete(h[j], true, "");
      s.remove_slot(rid);
      if ((i / per_slot) % 64 == 0) s.take_finished();
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  run(ops / 10, 1);
  const double secs = run(ops, 2);
  std::printf("{\"ops\": %ld, \"seconds\": %.6f, \"core_ops_per_s\": %.1f, \"api_calls_per_s\": %.1f}\n",
              ops, secs, ops / secs, ops * 3.5 / secs);
  return 0;
}
