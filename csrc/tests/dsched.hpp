// DSched: a deterministic scheduler for the core's tests (house style guide STYLE.md, B4; after the
// idea of folly's DeterministicSchedule, our own code).
//
// Compiled in place of the standard primitives through the seam in csrc/core/sync.hpp
// (KVSCHED_SYNC_HEADER). Test threads are real std::threads, but only the thread holding the
// *baton* runs. Before every access to a seam object (each atomic operation, each lock, unlock,
// wait and notify) the running thread calls Sched::point(), which picks the next thread to run
// with a seeded PRNG among the runnable ones and hands it the baton. The same seed gives the same
// interleaving, so a failing seed can be replayed (`test_dsched 1 <seed>`), provided the code
// under test makes the same choices: the core hashes op addresses into wait stripes, so
// test_dsched.cpp makes addresses modulo 64 deterministic with its own operator new
// (DSCHED_REPLAY_CHECK=1 verifies replay).
//
// Model
//   - Sequential consistency. An Atomic<T> is a plain T read and written by the baton holder; the
//     memory_order arguments are accepted and ignored. DSched explores *interleavings* of the
//     core's steps (logic races: double decisions, lost wakeups, leaked tokens, stranded ops); it
//     does not explore weak-memory reorderings. ThreadSanitizer covers those (STYLE.md B1).
//   - Runnable: a thread at a scheduling point, or a blocked thread whose condition now holds (the
//     Mutex it waits for is free; its CondVar waiter was notified). A thread blocked on a Mutex
//     held by another thread, or waiting on a CondVar not yet notified, is not runnable.
//   - Time is logical. CondVar::wait_until with time_point::max() never times out. A finite
//     deadline times out only when no thread is runnable (the clock "jumps" to the earliest
//     deadline), so timeouts model quiescence, never a race with real time.
//   - Optional perturbations, both legal for the real primitives: spurious CondVar wakeups, and
//     spurious failure of compare_exchange_weak. notify_one wakes a waiter chosen by the PRNG.
//   - When no thread is runnable and none waits with a deadline, the run fails with
//     "deadlock/lost wakeup". The harness cannot unwind threads blocked inside the core, so such a
//     run is *abandoned*: its threads stay blocked for ever and everything they reference is leaked
//     (run() reports `abandoned`, and the caller must leak its own state too).
//   - Threads must be created by run(). A seam access from any other thread while a run is active
//     aborts the process. Outside a run (the main thread setting up or checking a scenario) the
//     seam objects behave as plain, single-threaded objects.
//   - Strategies: uniform random choice at every point, or PCT (random thread priorities, the
//     highest-priority runnable thread runs, and d-1 random steps lower the running thread's
//     priority: few preemptions, deep into one thread, as in loom's preemption bound).
//   - A per-step invariant (Options::invariant) runs before every scheduling point with the seam in
//     "aux" mode: nothing is scheduled, and a lock held by a suspended thread makes the check skip
//     this step (AuxSkip) instead of blocking. It may call the core's read-only methods (stats()).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace kvsched::dsched {

enum class Strategy { kUniform, kPct };

struct Options {
  uint64_t seed = 0;
  Strategy strategy = Strategy::kUniform;
  int pct_depth = 2;               // PCT: number of priority change points + 1
  uint64_t pct_steps = 1000;       // PCT: change points are drawn in [1, pct_steps]
  uint64_t max_steps = 1000000;    // more steps than this: "step limit (livelock?)"
  unsigned spurious_wakeup_pm = 5;   // per mille, per step, when some CondVar waiter exists
  unsigned cas_weak_fail_pm = 30;    // per mille: compare_exchange_weak fails spuriously
  std::function<void()> invariant;   // per-step check (aux mode), may be empty
  bool trace = false;                // print every step to stderr
  double watchdog_s = 60;            // real-time bound without a step: the harness itself hung
};

struct ThreadSpec {
  std::string name;
  std::function<void()> body;
};

struct Result {
  uint64_t steps = 0;        // scheduling points
  uint64_t switches = 0;     // baton hand-offs to another thread
  uint64_t time_jumps = 0;   // timed waits released at quiescence
  uint64_t aux_skipped = 0;  // invariant checks skipped (a lock was held)
  uint64_t trace_hash = 0;   // hash of the sequence of running threads (replay check)
  bool abandoned = false;    // deadlock or step limit: threads and state leaked
};

// Failures of the current run (harness threads and the main thread's checks). Guarded by a real
// mutex; appended to by the baton holder or by main while no run is active.
class Log {
 public:
  static void add(std::string msg) {
    std::lock_guard<std::mutex> lock(mu());
    if (entries().size() < 64) entries().push_back(std::move(msg));
    ++count();
  }
  static std::vector<std::string> take(size_t* total) {
    std::lock_guard<std::mutex> lock(mu());
    std::vector<std::string> out;
    out.swap(entries());
    *total = count();
    count() = 0;
    return out;
  }

 private:
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::string>& entries() {
    static std::vector<std::string> v;
    return v;
  }
  static size_t& count() {
    static size_t n = 0;
    return n;
  }
};

class Sched;

namespace detail {
inline thread_local Sched* tl_sched = nullptr;
inline thread_local int tl_tid = -1;
inline std::atomic<Sched*> g_active{nullptr};
struct AuxSkip {};  // thrown inside an invariant check that would have to block

inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
}  // namespace detail

// A CondVar waiter, on the waiting thread's stack while it sleeps.
struct Waiter {
  bool notified = false;
  bool timed_out = false;
  bool spurious = false;
  std::vector<Waiter*>* list = nullptr;  // the CondVar's waiter list while registered
  bool woken() const { return notified || timed_out || spurious; }
  void unlink() {
    if (!list) return;
    list->erase(std::remove(list->begin(), list->end(), this), list->end());
    list = nullptr;
  }
};

class Sched {
 public:
  Sched(Options o, std::vector<ThreadSpec> specs)
      : opt_(std::move(o)), specs_(std::move(specs)), threads_(specs_.size()), rng_(opt_.seed) {
    const int n = static_cast<int>(threads_.size());
    if (opt_.strategy == Strategy::kPct) {
      // Distinct initial priorities >= depth; change point i (1-based) lowers to depth - i.
      std::vector<int> prios(n);
      for (int i = 0; i < n; ++i) prios[i] = opt_.pct_depth + i;
      for (int i = n - 1; i > 0; --i) std::swap(prios[i], prios[rand_below(i + 1)]);
      for (int i = 0; i < n; ++i) threads_[i].prio = prios[i];
      for (int i = 1; i < opt_.pct_depth; ++i)
        change_points_.push_back(1 + rand_below(std::max<uint64_t>(1, opt_.pct_steps)));
      std::sort(change_points_.begin(), change_points_.end());
    }
  }

  // Runs all threads to completion (or abandonment). Called by the main thread.
  Result run_main() {
    Sched* expected = nullptr;
    if (!detail::g_active.compare_exchange_strong(expected, this)) die("nested DSched runs");
    // Create every thread before any runs, so that nothing (allocation included) happens
    // concurrently with the first scheduled step.
    std::vector<std::thread> ts;
    ts.reserve(threads_.size());
    for (int i = 0; i < static_cast<int>(threads_.size()); ++i)
      ts.emplace_back([this, i] { thread_main(i); });
    {
      std::unique_lock<std::mutex> lock(m_);
      running_ = choose(candidates(-1));
      threads_[running_].cv.notify_one();
      uint64_t last = steps_atomic_.load(std::memory_order_relaxed);
      auto last_change = std::chrono::steady_clock::now();
      while (!all_done_ && !abandoned_) {
        main_cv_.wait_for(lock, std::chrono::milliseconds(200));
        const uint64_t now_steps = steps_atomic_.load(std::memory_order_relaxed);
        if (now_steps != last) {
          last = now_steps;
          last_change = std::chrono::steady_clock::now();
        } else if (std::chrono::steady_clock::now() - last_change >
                   std::chrono::duration<double>(opt_.watchdog_s)) {
          die("watchdog: no scheduling step for " + std::to_string(opt_.watchdog_s) +
              " s (a thread blocks outside the seam?) seed " + std::to_string(opt_.seed));
        }
      }
    }
    result_.abandoned = abandoned_;
    if (abandoned_) {
      for (auto& t : ts) t.detach();
    } else {
      for (auto& t : ts) t.join();
    }
    detail::g_active.store(nullptr);
    result_.steps = steps_;
    return result_;
  }

  // ---- called by the baton holder ----

  void point(const char* what, const void* obj) {
    step(what, obj);
    const int me = detail::tl_tid;
    if (!change_points_.empty() && next_cp_ < change_points_.size() &&
        change_points_[next_cp_] <= steps_) {
      threads_[me].prio = opt_.pct_depth - 1 - static_cast<int>(next_cp_);
      ++next_cp_;
    }
    maybe_spurious_wakeup();
    const int next = pick(me);
    if (next != me) hand_off(me, next, /*wait=*/true);
  }

  // Blocks the baton holder until `ready()` holds (evaluated by whoever picks the next thread).
  void block(std::function<bool()> ready, const char* what, const void* obj, Waiter* w = nullptr,
             bool timed = false, int64_t deadline = 0) {
    const int me = detail::tl_tid;
    Thread& t = threads_[me];
    t.st = kBlocked;
    t.ready = std::move(ready);
    t.what = what;
    t.obj = obj;
    t.waiter = w;
    t.timed = timed;
    t.deadline = deadline;
    step(what, obj);
    maybe_spurious_wakeup();
    const int next = pick(me);
    if (next != me) hand_off(me, next, /*wait=*/true);
  }

  bool in_aux() const { return in_aux_; }
  uint64_t rand() { return detail::splitmix(rng_); }
  uint64_t rand_below(uint64_t n) { return n <= 1 ? 0 : rand() % n; }
  bool chance_pm(unsigned per_mille) { return per_mille != 0 && rand_below(1000) < per_mille; }
  const Options& options() const { return opt_; }
  std::string thread_name(int tid) const {
    return tid >= 0 && tid < static_cast<int>(specs_.size()) ? specs_[tid].name : "main";
  }

  // Abandons the run from the baton holder: records `why`, wakes main, never returns.
  [[noreturn]] void abandon(const std::string& why) {
    std::string msg = why + "\n" + describe();
    Log::add(msg);
    std::unique_lock<std::mutex> lock(m_);
    abandoned_ = true;
    main_cv_.notify_all();
    const int me = detail::tl_tid;
    for (;;) threads_[me].cv.wait(lock);
  }

  [[noreturn]] static void die(const std::string& why) {
    std::fprintf(stderr, "dsched: fatal: %s\n", why.c_str());
    std::fflush(stderr);
    std::abort();
  }

 private:
  enum State { kReady, kBlocked, kDone };
  struct Thread {
    std::condition_variable cv;
    State st = kReady;
    std::function<bool()> ready;
    const char* what = "start";
    const void* obj = nullptr;
    Waiter* waiter = nullptr;
    bool timed = false;
    int64_t deadline = 0;
    int prio = 0;
  };
  struct TraceEntry {
    int tid;
    const char* what;
    const void* obj;
  };

  void thread_main(int i) {
    detail::tl_sched = this;
    detail::tl_tid = i;
    {
      std::unique_lock<std::mutex> lock(m_);
      threads_[i].cv.wait(lock, [&] { return running_ == i; });
    }
    try {
      specs_[i].body();
    } catch (const std::exception& e) {
      Log::add("thread '" + specs_[i].name + "': uncaught exception: " + e.what());
    } catch (...) {
      Log::add("thread '" + specs_[i].name + "': uncaught non-std exception");
    }
    finish(i);
  }

  void finish(int me) {
    Thread& t = threads_[me];
    t.st = kDone;
    t.what = "done";
    ++done_count_;
    step("exit", nullptr);
    if (done_count_ == static_cast<int>(threads_.size())) {
      std::lock_guard<std::mutex> lock(m_);
      all_done_ = true;
      main_cv_.notify_all();
      return;
    }
    const int next = pick(me);
    hand_off(me, next, /*wait=*/false);
  }

  void step(const char* what, const void* obj) {
    ++steps_;
    steps_atomic_.store(steps_, std::memory_order_relaxed);
    const int me = detail::tl_tid;
    result_.trace_hash = (result_.trace_hash ^ static_cast<uint64_t>(me + 1)) * 0x100000001b3ULL;
    ring_[ring_pos_++ % kRing] = TraceEntry{me, what, obj};
    if (opt_.trace)
      std::fprintf(stderr, "[%llu] %s: %s %p\n", static_cast<unsigned long long>(steps_),
                   thread_name(me).c_str(), what, obj);
    if (steps_ > opt_.max_steps) abandon("step limit " + std::to_string(opt_.max_steps) +
                                         " exceeded (livelock?)");
    if (opt_.invariant) {
      in_aux_ = true;
      try {
        opt_.invariant();
      } catch (const detail::AuxSkip&) {
        ++result_.aux_skipped;
      } catch (const std::exception& e) {
        Log::add(std::string("invariant check threw: ") + e.what());
      }
      in_aux_ = false;
    }
  }

  bool runnable(int i) const {
    const Thread& t = threads_[i];
    if (t.st == kReady) return true;
    return t.st == kBlocked && t.ready && t.ready();
  }

  std::vector<int> candidates(int /*me*/) const {
    std::vector<int> c;
    for (int i = 0; i < static_cast<int>(threads_.size()); ++i)
      if (runnable(i)) c.push_back(i);
    return c;
  }

  int choose(const std::vector<int>& c) {
    if (opt_.strategy == Strategy::kPct) {
      int best = c[0];
      for (int i : c)
        if (threads_[i].prio > threads_[best].prio) best = i;
      return best;
    }
    return c[rand_below(c.size())];
  }

  // Picks the next thread to run; `me` is the caller (it may be blocked or done).
  int pick(int me) {
    std::vector<int> c = candidates(me);
    if (c.empty()) {
      // Quiescence: the logical clock jumps to the earliest deadline of a timed CondVar wait.
      int best = -1;
      for (int i = 0; i < static_cast<int>(threads_.size()); ++i) {
        const Thread& t = threads_[i];
        if (t.st == kBlocked && t.timed && t.waiter && !t.waiter->woken() &&
            (best < 0 || t.deadline < threads_[best].deadline))
          best = i;
      }
      if (best < 0)
        abandon("deadlock/lost wakeup: no thread is runnable and none waits with a deadline "
                "(seed " + std::to_string(opt_.seed) + ")");
      threads_[best].waiter->timed_out = true;
      threads_[best].waiter->unlink();
      ++result_.time_jumps;
      c.push_back(best);
    }
    const int next = choose(c);
    Thread& t = threads_[next];
    if (t.st == kBlocked) {
      t.st = kReady;
      t.ready = nullptr;
      t.waiter = nullptr;
      t.timed = false;
    }
    return next;
  }

  void maybe_spurious_wakeup() {
    if (opt_.spurious_wakeup_pm == 0) return;
    std::vector<int> sleepers;
    for (int i = 0; i < static_cast<int>(threads_.size()); ++i) {
      const Thread& t = threads_[i];
      if (t.st == kBlocked && t.waiter && !t.waiter->woken()) sleepers.push_back(i);
    }
    if (sleepers.empty() || !chance_pm(opt_.spurious_wakeup_pm)) return;
    Waiter* w = threads_[sleepers[rand_below(sleepers.size())]].waiter;
    w->spurious = true;
    w->unlink();
  }

  void hand_off(int me, int next, bool wait) {
    ++result_.switches;
    std::unique_lock<std::mutex> lock(m_);
    running_ = next;
    threads_[next].cv.notify_one();
    if (wait) threads_[me].cv.wait(lock, [&] { return running_ == me; });
  }

  std::string describe() const {
    std::string s = "  seed " + std::to_string(opt_.seed) + ", step " + std::to_string(steps_) +
                    ", strategy " + (opt_.strategy == Strategy::kPct ? "pct" : "uniform") + "\n";
    for (int i = 0; i < static_cast<int>(threads_.size()); ++i) {
      const Thread& t = threads_[i];
      char buf[160];
      std::snprintf(buf, sizeof buf, "  thread %d '%s': %s (%s %p)%s\n", i, specs_[i].name.c_str(),
                    t.st == kReady ? "ready" : t.st == kBlocked ? "blocked" : "done", t.what,
                    t.obj, t.timed ? " timed" : "");
      s += buf;
    }
    s += "  last steps:";
    const uint64_t n = std::min<uint64_t>(ring_pos_, kRing);
    for (uint64_t k = ring_pos_ - n; k < ring_pos_; ++k) {
      const TraceEntry& e = ring_[k % kRing];
      s += " " + thread_name(e.tid) + ":" + e.what;
    }
    return s;
  }

  static constexpr uint64_t kRing = 24;

  const Options opt_;
  const std::vector<ThreadSpec> specs_;
  std::vector<Thread> threads_;
  uint64_t rng_;
  std::vector<uint64_t> change_points_;
  size_t next_cp_ = 0;

  // Guarded by the baton (only the running thread touches them).
  uint64_t steps_ = 0;
  int done_count_ = 0;
  bool in_aux_ = false;
  Result result_;
  TraceEntry ring_[kRing] = {};
  uint64_t ring_pos_ = 0;

  std::atomic<uint64_t> steps_atomic_{0};  // read by the watchdog
  std::mutex m_;                           // guards running_, all_done_, abandoned_
  std::condition_variable main_cv_;
  int running_ = -1;
  bool all_done_ = false;
  bool abandoned_ = false;
};

// Runs one schedule. On `abandoned`, the Sched and the threads are leaked (they are blocked for
// ever), and the caller must leak whatever the threads reference.
inline Result run(Options opt, std::vector<ThreadSpec> threads) {
  auto* s = new Sched(std::move(opt), std::move(threads));
  Result r = s->run_main();
  if (!r.abandoned) delete s;
  return r;
}

namespace detail {
// The scheduler the calling thread must go through, or nullptr for direct (plain) access: the main
// thread outside a run, or any thread inside an invariant check (aux mode).
inline Sched* scheduling() {
  Sched* s = tl_sched;
  if (s) return s->in_aux() ? nullptr : s;
  if (g_active.load(std::memory_order_relaxed) != nullptr)
    Sched::die("seam access from a thread not created by dsched::run() during a run (the core's "
               "deadline thread? use op_timeout_ns = 0)");
  return nullptr;
}

// Direct access found a lock taken: inside an invariant check, skip the check; otherwise the
// single-threaded caller would block for ever.
[[noreturn]] inline void direct_would_block(const char* what) {
  if (tl_sched) throw AuxSkip{};
  Sched::die(std::string(what) + " would block outside a run (lock already held)");
}

inline void point(const char* what, const void* obj) {
  if (Sched* s = scheduling()) s->point(what, obj);
}
}  // namespace detail

// n extra scheduling points (lets a test thread "take time" between two of its steps).
inline void yield_points(int n) {
  for (int i = 0; i < n; ++i) detail::point("yield", nullptr);
}

}  // namespace kvsched::dsched

// ------------------------------------------------------------------------------------------------
// The seam: the names csrc/core/sync.hpp expects.

namespace kvsched::core {

inline void sync_point() { dsched::detail::point("sync_point", nullptr); }

template <class T>
class Atomic {
 public:
  Atomic() noexcept : v_{} {}
  Atomic(T v) noexcept : v_(v) {}  // NOLINT: implicit, as std::atomic
  Atomic(const Atomic&) = delete;
  Atomic& operator=(const Atomic&) = delete;

  T load(std::memory_order = std::memory_order_seq_cst) const {
    dsched::detail::point("atomic.load", this);
    return v_;
  }
  void store(T v, std::memory_order = std::memory_order_seq_cst) {
    dsched::detail::point("atomic.store", this);
    v_ = v;
  }
  operator T() const { return load(); }  // NOLINT
  T operator=(T v) {
    store(v);
    return v;
  }
  T exchange(T v, std::memory_order = std::memory_order_seq_cst) {
    dsched::detail::point("atomic.exchange", this);
    T old = v_;
    v_ = v;
    return old;
  }
  T fetch_add(T d, std::memory_order = std::memory_order_seq_cst) {
    dsched::detail::point("atomic.fetch_add", this);
    T old = v_;
    v_ = static_cast<T>(old + d);
    return old;
  }
  T fetch_sub(T d, std::memory_order = std::memory_order_seq_cst) {
    dsched::detail::point("atomic.fetch_sub", this);
    T old = v_;
    v_ = static_cast<T>(old - d);
    return old;
  }
  T fetch_or(T d, std::memory_order = std::memory_order_seq_cst) {
    dsched::detail::point("atomic.fetch_or", this);
    T old = v_;
    v_ = static_cast<T>(old | d);
    return old;
  }
  T fetch_and(T d, std::memory_order = std::memory_order_seq_cst) {
    dsched::detail::point("atomic.fetch_and", this);
    T old = v_;
    v_ = static_cast<T>(old & d);
    return old;
  }
  bool compare_exchange_strong(T& expected, T desired, std::memory_order,
                               std::memory_order) {
    return cas(expected, desired, false);
  }
  bool compare_exchange_strong(T& expected, T desired,
                               std::memory_order = std::memory_order_seq_cst) {
    return cas(expected, desired, false);
  }
  bool compare_exchange_weak(T& expected, T desired, std::memory_order, std::memory_order) {
    return cas(expected, desired, true);
  }
  bool compare_exchange_weak(T& expected, T desired,
                             std::memory_order = std::memory_order_seq_cst) {
    return cas(expected, desired, true);
  }

 private:
  bool cas(T& expected, T desired, bool weak) {
    dsched::Sched* s = dsched::detail::scheduling();
    if (s) s->point(weak ? "atomic.cas_weak" : "atomic.cas", this);
    if (v_ == expected) {
      // A weak CAS may fail although the values are equal (LL/SC); `expected` stays correct.
      if (weak && s && s->chance_pm(s->options().cas_weak_fail_pm)) return false;
      v_ = desired;
      return true;
    }
    expected = v_;
    return false;
  }

  T v_;
};

class Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() {
    if (dsched::Sched* s = dsched::detail::scheduling()) {
      s->point("mutex.lock", this);
      if (held_ && owner_ == dsched::detail::tl_tid)
        s->abandon("recursive Mutex::lock (self-deadlock) by '" +
                   s->thread_name(dsched::detail::tl_tid) + "'");
      if (held_) s->block([this] { return !held_; }, "mutex.lock (waits)", this);
      held_ = true;
      owner_ = dsched::detail::tl_tid;
      return;
    }
    if (held_) dsched::detail::direct_would_block("Mutex::lock");
    held_ = true;
    owner_ = kDirect;
  }
  bool try_lock() {
    dsched::detail::point("mutex.try_lock", this);
    if (held_) return false;
    held_ = true;
    owner_ = dsched::detail::scheduling() ? dsched::detail::tl_tid : kDirect;
    return true;
  }
  void unlock() {
    if (dsched::Sched* s = dsched::detail::scheduling()) {
      s->point("mutex.unlock", this);
      if (!held_ || owner_ != dsched::detail::tl_tid)
        s->abandon("Mutex::unlock by '" + s->thread_name(dsched::detail::tl_tid) +
                   "', which does not hold it");
    }
    held_ = false;
    owner_ = kNone;
  }

 private:
  static constexpr int kNone = -1, kDirect = -2;
  bool held_ = false;
  int owner_ = kNone;
};

class SharedMutex {
 public:
  SharedMutex() = default;
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  void lock() {
    if (dsched::Sched* s = dsched::detail::scheduling()) {
      s->point("shared_mutex.lock", this);
      if (writer_ || readers_ > 0)
        s->block([this] { return !writer_ && readers_ == 0; }, "shared_mutex.lock (waits)", this);
    } else if (writer_ || readers_ > 0) {
      dsched::detail::direct_would_block("SharedMutex::lock");
    }
    writer_ = true;
  }
  bool try_lock() {
    dsched::detail::point("shared_mutex.try_lock", this);
    if (writer_ || readers_ > 0) return false;
    writer_ = true;
    return true;
  }
  void unlock() {
    dsched::detail::point("shared_mutex.unlock", this);
    writer_ = false;
  }
  void lock_shared() {
    if (dsched::Sched* s = dsched::detail::scheduling()) {
      s->point("shared_mutex.lock_shared", this);
      if (writer_) s->block([this] { return !writer_; }, "shared_mutex.lock_shared (waits)", this);
    } else if (writer_) {
      dsched::detail::direct_would_block("SharedMutex::lock_shared");
    }
    ++readers_;
  }
  bool try_lock_shared() {
    dsched::detail::point("shared_mutex.try_lock_shared", this);
    if (writer_) return false;
    ++readers_;
    return true;
  }
  void unlock_shared() {
    dsched::detail::point("shared_mutex.unlock_shared", this);
    --readers_;
  }

 private:
  bool writer_ = false;
  int readers_ = 0;
};

// Condition variable over any lock of the seam (in the core: std::unique_lock<Mutex>). Notify
// picks the woken waiter with the PRNG; waits may wake spuriously (Options::spurious_wakeup_pm).
class CondVar {
 public:
  CondVar() = default;
  CondVar(const CondVar&) = delete;
  CondVar& operator=(const CondVar&) = delete;

  template <class Lock>
  void wait(Lock& lock) {
    wait_impl(lock, false, 0);
  }
  template <class Lock, class Pred>
  void wait(Lock& lock, Pred pred) {
    while (!pred()) wait(lock);
  }
  template <class Lock, class C, class D>
  std::cv_status wait_until(Lock& lock, const std::chrono::time_point<C, D>& deadline) {
    if (deadline == std::chrono::time_point<C, D>::max()) {
      wait_impl(lock, false, 0);
      return std::cv_status::no_timeout;
    }
    const int64_t key =
        std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch()).count();
    return wait_impl(lock, true, key);
  }
  template <class Lock, class C, class D, class Pred>
  bool wait_until(Lock& lock, const std::chrono::time_point<C, D>& deadline, Pred pred) {
    while (!pred())
      if (wait_until(lock, deadline) == std::cv_status::timeout) return pred();
    return true;
  }
  template <class Lock, class R, class P>
  std::cv_status wait_for(Lock& lock, const std::chrono::duration<R, P>& d) {
    return wait_until(lock, std::chrono::steady_clock::now() + d);
  }
  template <class Lock, class R, class P, class Pred>
  bool wait_for(Lock& lock, const std::chrono::duration<R, P>& d, Pred pred) {
    return wait_until(lock, std::chrono::steady_clock::now() + d, std::move(pred));
  }

  void notify_one() {
    dsched::Sched* s = dsched::detail::scheduling();
    if (s) s->point("cv.notify_one", this);
    if (waiters_.empty()) return;
    const size_t i = s ? s->rand_below(waiters_.size()) : 0;
    dsched::Waiter* w = waiters_[i];
    w->notified = true;
    w->unlink();
  }
  void notify_all() {
    dsched::detail::point("cv.notify_all", this);
    while (!waiters_.empty()) {
      dsched::Waiter* w = waiters_.back();
      w->notified = true;
      w->unlink();
    }
  }

 private:
  template <class Lock>
  std::cv_status wait_impl(Lock& lock, bool timed, int64_t deadline) {
    dsched::Sched* s = dsched::detail::scheduling();
    if (!s) {
      if (dsched::detail::tl_sched) throw dsched::detail::AuxSkip{};
      dsched::Sched::die("CondVar wait outside a run would block for ever");
    }
    s->point(timed ? "cv.wait_until" : "cv.wait", this);
    dsched::Waiter w;
    w.list = &waiters_;
    waiters_.push_back(&w);  // registered before the unlock: no notify can be missed
    lock.unlock();
    if (!w.woken())
      s->block([&w] { return w.woken(); }, timed ? "cv.wait_until (sleeps)" : "cv.wait (sleeps)",
               this, &w, timed, deadline);
    w.unlink();
    lock.lock();
    return w.timed_out && !w.notified ? std::cv_status::timeout : std::cv_status::no_timeout;
  }

  std::vector<dsched::Waiter*> waiters_;
};

}  // namespace kvsched::core
