// The progress epoch: (iteration, layers complete, iteration complete) in one atomic word.
//
// Contract
//   - load() is wait-free (one acquire load). Marks are lock-free CAS loops: concurrent marks of
//     the same layer have exactly one winner; the loser gets ProtocolError (S7).
//   - The position only grows, so "requirement holds" is stable once true (S2).
//   - Not checked here: nothing about operations; the scheduler releases gated ops after a mark.
#pragma once

#include <cstdint>
#include <string>

#include "sync.hpp"
#include "types.hpp"

namespace kvsched::core {

class Progress {
 public:
  // num_layers == 0: unknown, only the 24-bit limit applies.
  explicit Progress(uint64_t num_layers) : num_layers_(num_layers) {}

  uint64_t load() const {
    // order: acquire — pairs with the acq_rel CAS of every mark below; a thread that sees a
    // position also sees what the marking thread wrote before marking.
    return position_.load(std::memory_order_acquire);
  }

  bool holds(uint64_t requirement) const { return load() >= requirement; }

  // Returns the new iteration number (iterations count from 1).
  uint64_t start_next_iteration() {
    uint64_t cur = load();
    for (;;) {
      uint64_t it = position_iteration(cur);
      if (it >= kMaxIteration) throw Error(ErrorCode::kProtocol, "iteration counter exhausted");
      uint64_t next = make_position(it + 1, 0);
      // order: acq_rel — release publishes the mark to requirement checks (acquire in load());
      // acquire on success keeps marks totally ordered with each other. Failure reloads (acquire).
      if (position_.compare_exchange_weak(cur, next, std::memory_order_acq_rel,
                                          std::memory_order_acquire))
        return it + 1;
    }
  }

  // Returns the new position.
  uint64_t mark_layer_complete(uint64_t layer) {
    uint64_t cur = load();
    for (;;) {
      const uint64_t it = position_iteration(cur);
      const uint64_t stage = position_stage(cur);
      if (it == 0)
        throw Error(ErrorCode::kProtocol,
                    "mark_layer_complete(" + std::to_string(layer) +
                        ") outside an iteration: call start_next_iteration() first");
      if ((num_layers_ != 0 && layer >= num_layers_) || layer > kMaxLayer)
        throw Error(ErrorCode::kProtocol,
                    "layer " + std::to_string(layer) + " out of range (scheduler has " +
                        std::to_string(num_layers_) + " layers) in iteration " +
                        std::to_string(it));
      if (stage == kIterationDone)
        throw Error(ErrorCode::kProtocol, "mark_layer_complete(" + std::to_string(layer) +
                                              ") after iteration " + std::to_string(it) +
                                              " was marked complete");
      if (layer != stage)
        throw Error(ErrorCode::kProtocol,
                    "layer " + std::to_string(layer) + " marked out of order in iteration " +
                        std::to_string(it) + ": the next layer to mark is " +
                        std::to_string(stage));
      const uint64_t next = make_position(it, layer + 1);
      // order: acq_rel — as in start_next_iteration().
      if (position_.compare_exchange_weak(cur, next, std::memory_order_acq_rel,
                                          std::memory_order_acquire))
        return next;
    }
  }

  uint64_t mark_iteration_complete() {
    uint64_t cur = load();
    for (;;) {
      const uint64_t it = position_iteration(cur);
      if (it == 0)
        throw Error(ErrorCode::kProtocol,
                    "mark_iteration_complete() outside an iteration: call "
                    "start_next_iteration() first");
      if (position_stage(cur) == kIterationDone)
        throw Error(ErrorCode::kProtocol,
                    "iteration " + std::to_string(it) + " is already marked complete");
      const uint64_t next = make_position(it, kIterationDone);
      // order: acq_rel — as in start_next_iteration().
      if (position_.compare_exchange_weak(cur, next, std::memory_order_acq_rel,
                                          std::memory_order_acquire))
        return next;
    }
  }


 private:
  const uint64_t num_layers_;
  Atomic<uint64_t> position_{0};
};

}  // namespace kvsched::core
