// A lock-free log-linear histogram of nanosecond latencies (4 buckets per power of two).
//
// Contract: record() is wait-free (one relaxed fetch_add); quantile() is a best-effort snapshot.
#pragma once

#include <array>
#include <cstdint>

#include "sync.hpp"

namespace kvsched::core {

class LatencyHistogram {
 public:
  static constexpr int kSubBuckets = 4;
  static constexpr int kBuckets = 64 * kSubBuckets;

  void record(int64_t ns) {
    if (ns < 1) ns = 1;
    // order: relaxed — statistic only; never read to make a decision.
    buckets_[index(static_cast<uint64_t>(ns))].fetch_add(1, std::memory_order_relaxed);
  }

  uint64_t count() const {
    uint64_t n = 0;
    // order: relaxed — statistic only.
    for (auto& b : buckets_) n += b.load(std::memory_order_relaxed);
    return n;
  }

  // Upper bound of the bucket holding quantile q (0..1), in ns; 0 when empty.
  double quantile(double q) const {
    std::array<uint64_t, kBuckets> snap{};
    uint64_t n = 0;
    for (int i = 0; i < kBuckets; ++i) {
      // order: relaxed — statistic only.
      snap[i] = buckets_[i].load(std::memory_order_relaxed);
      n += snap[i];
    }
    if (n == 0) return 0.0;
    uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(n - 1)) + 1;
    uint64_t seen = 0;
    for (int i = 0; i < kBuckets; ++i) {
      seen += snap[i];
      if (seen >= rank) return upper_bound(i);
    }
    return upper_bound(kBuckets - 1);
  }

 private:
  static int index(uint64_t v) {
    int msb = 63 - __builtin_clzll(v);
    int sub = msb >= 2 ? static_cast<int>((v >> (msb - 2)) & 3) : 0;
    return msb * kSubBuckets + sub;
  }
  static double upper_bound(int i) {
    int msb = i / kSubBuckets, sub = i % kSubBuckets;
    double base = static_cast<double>(uint64_t{1} << msb);
    return base + base * (sub + 1) / kSubBuckets;
  }

  std::array<Atomic<uint64_t>, kBuckets> buckets_{};
};

}  // namespace kvsched::core
