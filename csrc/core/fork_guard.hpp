// Fork detection: a scheduler belongs to the process that created it.
//
// fork() copies the parent's memory into the child but only the calling thread. A scheduler
// inherited that way is a diverged copy whose deadline thread does not exist, whose mutexes may
// be held for ever by parent threads that are not there, and whose operations the parent also
// owns. Using it could hang (a lock no thread will release) or move bytes twice, so every call
// on an inherited scheduler fails with ErrorCode::kForked, and its destruction is skipped (the
// binding layer leaks it in the child: freeing it would lock those mutexes and join a thread
// that does not exist).
//
// How a child is recognised: pthread_atfork registers a child handler (once per process, at
// static initialisation of the library) that bumps a process-wide generation counter. A
// scheduler stores the generation it was created in; a different one means "inherited".
// Comparing two integers costs one relaxed load, cheaper than getpid() (a system call in
// glibc >= 2.25), and it also tells a child whose pid happens to equal the parent's (pid
// namespaces) apart.
#pragma once

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

namespace kvsched::core {

// Not routed through sync.hpp's Atomic on purpose: the deterministic-schedule harness has no
// fork, and this counter is process state, not scheduler state.
inline std::atomic<uint64_t> g_fork_generation{0};

inline void on_fork_child() noexcept {
  // order: relaxed — the child runs this before fork() returns in its only thread; the later
  // loads are in that same thread or in threads it creates afterwards (thread creation
  // synchronises).
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
}

inline const bool g_fork_handler_registered = [] {
  return pthread_atfork(nullptr, nullptr, &on_fork_child) == 0;
}();

inline uint64_t fork_generation() {
  // order: relaxed — see on_fork_child().
  return g_fork_generation.load(std::memory_order_relaxed);
}

}  // namespace kvsched::core
