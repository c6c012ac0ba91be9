// The synchronisation seam of the core.
//
// Every atomic, mutex and condition variable in csrc/core goes through the aliases below. A normal
// build maps them to the standard library. A test build may define KVSCHED_SYNC_HEADER to a
// header of its own that provides the same names (kvsched::core::Atomic, Mutex, SharedMutex,
// CondVar, sync_point), so a deterministic scheduler can serialise the core's threads at every
// atomic access and every lock (see csrc/tests/dsched.hpp and docs/reliability.md).
#pragma once

#ifdef KVSCHED_SYNC_HEADER
#include KVSCHED_SYNC_HEADER
#else
#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <mutex>
#include <shared_mutex>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace kvsched::core {

template <class T>
using Atomic = std::atomic<T>;

// The design's progress claims (docs/design.md "Which calls wait") rest on these atomics being
// lock-free on every platform the core builds for: a std::atomic that fell back to a hidden
// mutex would make "lock-free" calls block.
static_assert(std::atomic<bool>::is_always_lock_free, "atomic<bool> must be lock-free");
static_assert(std::atomic<uint8_t>::is_always_lock_free, "atomic<uint8_t> must be lock-free");
static_assert(std::atomic<int32_t>::is_always_lock_free, "atomic<int32_t> must be lock-free");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "atomic<uint32_t> must be lock-free");
static_assert(std::atomic<int64_t>::is_always_lock_free, "atomic<int64_t> must be lock-free");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "atomic<uint64_t> must be lock-free");
using SharedMutex = std::shared_mutex;
using CondVar = std::condition_variable_any;

// A std::mutex that spins briefly before it sleeps. Every critical section in the core is short
// (a few hundred nanoseconds to about a microsecond), but a contended std::mutex parks the thread
// in the kernel (futex wait, then a futex wake and a context switch for the unlocker): with two
// threads driving one scheduler those syscalls took a third of the time, and two threads did
// fewer op lifecycles per second than one (bench_core N 2). 64 tries with a pause in between
// (roughly 0.5 to 3 us, depending on the CPU's pause latency) let the lock change hands in user
// space; a holder that was preempted costs only the spin. Each try is a try_lock, an atomic write
// to the lock's line: with one or two waiters that is cheaper than the syscalls it replaces.
class Mutex {
 public:
  void lock() {
    for (int i = 0; i < kSpins; ++i) {
      if (mu_.try_lock()) return;
      relax();
    }
    mu_.lock();
  }
  bool try_lock() { return mu_.try_lock(); }
  void unlock() { mu_.unlock(); }

 private:
  static constexpr int kSpins = 64;
  static void relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  std::mutex mu_;
};

}  // namespace kvsched::core
#endif
