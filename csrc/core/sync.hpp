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
#include <condition_variable>
#include <mutex>
#include <shared_mutex>

namespace kvsched::core {

template <class T>
using Atomic = std::atomic<T>;
using Mutex = std::mutex;
using SharedMutex = std::shared_mutex;
using CondVar = std::condition_variable_any;

}  // namespace kvsched::core
#endif
