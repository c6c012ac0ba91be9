// Throughput of the C++ core alone, no Python: `bench_core [ops] [threads]` (default one thread).
// Prints JSON.
// See csrc/bench/core_bench.hpp for what one op is.
#include <cstdio>
#include <cstdlib>

#include "bench/core_bench.hpp"

int main(int argc, char** argv) {
  const long ops = argc > 1 ? std::atol(argv[1]) : 2'000'000;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  if (ops < 1 || threads < 1 || threads > 64) {
    std::fprintf(stderr, "usage: bench_core [ops >= 1] [threads 1..64]\n");
    return 2;
  }
  auto r = kvsched::bench::run_core_bench(ops, threads);
  // 3 API calls per op plus create/remove amortised over 4 ops: 3.5 calls per op.
  std::printf("{\"ops\": %ld, \"threads\": %d, \"seconds\": %.6f, \"core_ops_per_s\": %.1f, "
              "\"api_calls_per_s\": %.1f}\n",
              r.ops, threads, r.seconds, r.ops / r.seconds, r.ops * 3.5 / r.seconds);
  return 0;
}
