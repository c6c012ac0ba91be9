// Deadlines: the one thread that times out undecided operations (contract S12, op_timeout).
//
// Contract
//   - Every operation gets the same timeout, so deadlines expire in the order they were added: a
//     FIFO, O(1) per add. The thread sleeps until the oldest deadline (or an add) and calls
//     `on_expired(op)` for each expired one, with no lock held (the callback decides whether the
//     op is still undecided and cancels it).
//   - start() is called at most once; stop() is idempotent, wakes the thread and joins it (not
//     from the thread itself). No thread exists when op_timeout is 0.
//   - Lock: one leaf mutex guarding the FIFO and the stop flag, never held while calling out.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "op.hpp"
#include "sync.hpp"

namespace kvsched::core {

class Deadlines {
 public:
  using Clock = std::chrono::steady_clock;

  ~Deadlines() { stop(); }

  void start(std::function<void(const OpPtr&)> on_expired) {
    thread_ = std::thread([this, fn = std::move(on_expired)] { run(fn); });
  }

  void add(Clock::time_point when, OpPtr op) {
    std::lock_guard<Mutex> lock(mu_);
    if (stop_) return;
    fifo_.emplace_back(when, std::move(op));
    cv_.notify_one();
  }

  void stop() {
    {
      std::lock_guard<Mutex> lock(mu_);
      stop_ = true;
      fifo_.clear();
    }
    cv_.notify_all();
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
  }

 private:
  void run(const std::function<void(const OpPtr&)>& on_expired) {
    std::unique_lock<Mutex> lock(mu_);
    while (!stop_) {
      if (fifo_.empty()) {
        cv_.wait(lock);
        continue;
      }
      auto [when, op] = fifo_.front();
      if (Clock::now() < when) {
        cv_.wait_until(lock, when);
        continue;
      }
      fifo_.pop_front();
      lock.unlock();
      on_expired(op);
      lock.lock();
    }
  }

  Mutex mu_;
  CondVar cv_;
  std::deque<std::pair<Clock::time_point, OpPtr>> fifo_;  // guarded by mu_
  bool stop_ = false;                                     // guarded by mu_
  std::thread thread_;
};

}  // namespace kvsched::core
