// Latency of the forward thread's calls while another thread keeps the scheduler busy:
// `bench_forward [iterations] [layers]`. Prints JSON.
//
// The forward thread of a serving engine calls mark_layer_complete once per layer, reads
// is_complete for its requests and reads decisions. Those calls must not stall behind another
// thread's lock. This measures each call's latency (p50, p99, p99.9, max; nanoseconds) in two
// passes of the same run: with the executor thread idle, and with it running op lifecycles as
// fast as it can (enqueue + schedule gated on the forward thread's layers + mark_complete, slots
// created and removed), so the two share the gate, the ready queue, the slot table and the join
// table. Ratios between the passes are the figures to read (the machine is shared).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "core/scheduler.hpp"

using namespace kvsched::core;
using Clock = std::chrono::steady_clock;

namespace {

struct Quantiles {
  double p50 = 0, p99 = 0, p999 = 0, max = 0;
};

Quantiles quantiles(std::vector<int64_t> v) {
  Quantiles q;
  if (v.empty()) return q;
  std::sort(v.begin(), v.end());
  auto at = [&](double f) {
    return static_cast<double>(v[std::min(v.size() - 1, static_cast<size_t>(f * v.size()))]);
  };
  q.p50 = at(0.50);
  q.p99 = at(0.99);
  q.p999 = at(0.999);
  q.max = static_cast<double>(v.back());
  return q;
}

int64_t ns_since(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
}

struct Pass {
  std::vector<int64_t> mark, complete, decision;
  long executor_ops = 0;
};

Pass run_pass(long iterations, uint64_t layers, bool busy) {
  Config c;
  c.max_inflight = 1 << 20;  // the executor never waits for a token: pure lock contention
  c.num_layers = layers;
  Scheduler s(c);
  // The forward thread's own request: one op per layer, so is_complete and a decision are real.
  s.create_slot("fwd");
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> iteration{0};
  Pass pass;
  std::thread executor([&] {
    if (!busy) return;
    long n = 0;
    uint64_t seq = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const std::string rid = "x" + std::to_string(n % 64);
      s.create_slot(rid);
      OpPtr ops[4];
      // order: relaxed — a hint of the current iteration, to gate on layers still to come.
      const uint64_t it = iteration.load(std::memory_order_relaxed);
      for (int j = 0; j < 4; ++j) {
        const Uuid u{7, ++seq};
        s.enqueue(rid, u, j % 2 ? Kind::kStore : Kind::kLoad, Mode::kScheduled);
        const uint64_t req = it ? layer_requirement(static_cast<uint64_t>(j) % layers, it) : 0;
        ops[j] = s.schedule(rid, u, req, Mode::kScheduled);
      }
      for (auto& op : ops) {
        while (op->load_decision() == Decision::kNone && !stop.load(std::memory_order_relaxed))
          std::this_thread::yield();
        if (op->load_decision() == Decision::kExecute) s.mark_complete(op, true, {});
      }
      if (s.is_complete(rid)) s.remove_slot(rid);
      ++n;
    }
    pass.executor_ops = n * 4;
  });
  uint64_t fwd_seq = 0;
  for (long i = 0; i < iterations; ++i) {
    const uint64_t it = s.start_next_iteration();
    // order: relaxed — see the executor.
    iteration.store(it, std::memory_order_relaxed);
    const Uuid u{9, ++fwd_seq};
    s.enqueue("fwd", u, Kind::kStore, Mode::kScheduled);
    OpPtr op = s.schedule("fwd", u, layer_requirement(layers - 1, it), Mode::kScheduled);
    for (uint64_t k = 0; k < layers; ++k) {
      auto t0 = Clock::now();
      s.mark_layer_complete(k);
      pass.mark.push_back(ns_since(t0));
      t0 = Clock::now();
      (void)s.is_complete("fwd");
      pass.complete.push_back(ns_since(t0));
      t0 = Clock::now();
      (void)op->load_decision();
      pass.decision.push_back(ns_since(t0));
    }
    if (op->load_decision() == Decision::kExecute) s.mark_complete(op, true, {});
    s.mark_iteration_complete();
  }
  stop.store(true, std::memory_order_relaxed);
  executor.join();
  s.close();
  return pass;
}

void print(const char* name, const Quantiles& idle, const Quantiles& busy, bool last) {
  std::printf(
      "  \"%s\": {\"idle\": {\"p50\": %.0f, \"p99\": %.0f, \"p99.9\": %.0f, \"max\": %.0f}, "
      "\"busy\": {\"p50\": %.0f, \"p99\": %.0f, \"p99.9\": %.0f, \"max\": %.0f}}%s\n",
      name, idle.p50, idle.p99, idle.p999, idle.max, busy.p50, busy.p99, busy.p999, busy.max,
      last ? "" : ",");
}

}  // namespace

int main(int argc, char** argv) {
  const long iterations = argc > 1 ? std::atol(argv[1]) : 20000;
  const long layers = argc > 2 ? std::atol(argv[2]) : 32;
  if (iterations < 1 || layers < 1 || layers > 4096) {
    std::fprintf(stderr, "usage: bench_forward [iterations >= 1] [layers 1..4096]\n");
    return 2;
  }
  run_pass(iterations / 10 + 1, static_cast<uint64_t>(layers), true);  // warm-up
  Pass idle = run_pass(iterations, static_cast<uint64_t>(layers), false);
  Pass busy = run_pass(iterations, static_cast<uint64_t>(layers), true);
  std::printf("{\"unit\": \"ns\", \"iterations\": %ld, \"layers\": %ld, \"executor_ops\": %ld,\n",
              iterations, layers, busy.executor_ops);
  print("mark_layer_complete", quantiles(idle.mark), quantiles(busy.mark), false);
  print("is_complete", quantiles(idle.complete), quantiles(busy.complete), false);
  print("decision_read", quantiles(idle.decision), quantiles(busy.decision), true);
  std::printf("}\n");
  return 0;
}
