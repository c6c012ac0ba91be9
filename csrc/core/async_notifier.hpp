// AsyncNotifier: wakes an event loop (asyncio) when operations it waits for are decided.
//
// An event loop cannot block in wait_decision(); it sleeps in its selector instead. One notifier
// per loop owns a file descriptor that the loop watches (an eventfd on Linux, a pipe elsewhere)
// and a list of tokens. The thread that decides a watched operation posts its token: it appends
// to the list and makes the descriptor readable, only if it is not already readable, so a burst
// of decisions costs one write. The loop, woken by its selector, drains the tokens and resolves
// the matching futures. No thread or timer per awaiting coroutine, and nothing runs while
// nothing is decided.
//
// Contract
//   post()  any thread, short lock; at most one write() per drain.
//   drain() the loop's thread; short lock; never blocks (the descriptor is non-blocking).
//   A token may be posted more than once (Scheduler::watch explains when): consumers ignore
//   tokens they no longer wait for.
#pragma once

#include <fcntl.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "sync.hpp"

namespace kvsched::core {

class AsyncNotifier {
 public:
  AsyncNotifier() {
#ifdef __linux__
    read_fd_ = write_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (read_fd_ < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
#else
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
    for (int fd : fds) {
      fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
      fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    read_fd_ = fds[0];
    write_fd_ = fds[1];
#endif
  }
  ~AsyncNotifier() {
    close(read_fd_);
    if (write_fd_ != read_fd_) close(write_fd_);
  }
  AsyncNotifier(const AsyncNotifier&) = delete;
  AsyncNotifier& operator=(const AsyncNotifier&) = delete;

  // The descriptor the event loop watches for readability.
  int fd() const { return read_fd_; }

  void post(uint64_t token) {
    std::lock_guard<Mutex> lock(mu_);
    ready_.push_back(token);
    if (signalled_) return;  // the loop has a wake-up pending; it will drain this token too
    signalled_ = true;
    signal();
  }

  // Tokens posted since the last drain, oldest first.
  std::vector<uint64_t> drain() {
    // Clear the descriptor before taking the list: a post after this read either lands in the
    // list we take below (it sees signalled_ and writes nothing), or comes after we reset
    // signalled_ and writes again. Reading after the swap instead could swallow the write of a
    // post made between the two, leaving its token unseen until some later post.
    clear_signal();
    std::vector<uint64_t> out;
    std::lock_guard<Mutex> lock(mu_);
    out.swap(ready_);
    signalled_ = false;
    return out;
  }

 private:
  void signal() {
#ifdef __linux__
    const uint64_t one = 1;
    ssize_t n = write(write_fd_, &one, sizeof one);
#else
    const char one = 1;
    ssize_t n = write(write_fd_, &one, 1);
#endif
    (void)n;  // EAGAIN: the counter or pipe is full, i.e. already readable
  }
  void clear_signal() {
    char buf[64];
    while (read(read_fd_, buf, sizeof buf) > 0) {
    }
  }

  Mutex mu_;
  std::vector<uint64_t> ready_;  // guarded by mu_
  bool signalled_ = false;       // guarded by mu_: a write is pending, not yet drained
  int read_fd_ = -1;
  int write_fd_ = -1;
};

}  // namespace kvsched::core
