// Handle: the user-facing object of one operation, its lifetime (one view per live object, drop
// detection) and its blocking wait; WorkerSide and TransferSide, the two sides' Python objects.
// Part of the binding module's one translation unit: included by module.cpp only, so its
// definitions live in an anonymous namespace like the rest of the module.
#pragma once

#include "core_state.hpp"

namespace py = pybind11;
using namespace kvsched::core;

namespace {

// The user-facing handle of one operation (contract section 3, docs/contract.md). At most one Handle object exists per
// op at a time (Op::binding_view), so poll() returns the very object schedule() returned while the
// caller still holds it.
class Handle {
 public:
  // adopt_view: the op already carries a view reference for us (from Scheduler::poll).
  Handle(StatePtr state, OpPtr op, bool adopt_view)
      : state_(std::move(state)), op_(std::move(op)) {
    // order: release — pairs with the acquire in Scheduler::on_handle_dropped().
    if (!adopt_view) op_->views.fetch_add(1, std::memory_order_release);
    op_->binding_view = this;
  }
  ~Handle() {
    if (op_->binding_view == this) op_->binding_view = nullptr;
    if (state_->sched.inherited()) return;  // forked child: the scheduler is not ours to touch
    try {
      if (state_->sched.release_view(op_)) {
        refs().on_dropped(op_->rid, op_->uuid.str());
      }
    } catch (...) {
      // A destructor must not throw; logging failures at interpreter shutdown are harmless.
      PyErr_Clear();
    }
  }

  // The handle object of `op`: the live one if there is one (so poll() returns the very object
  // schedule() returned), else a new one. `has_view`: the op carries a view reference from
  // Scheduler::poll, which the handle adopts (or gives back when a live one exists).
  static py::object wrap(const StatePtr& state, const OpPtr& op, bool has_view = false) {
    if (op->binding_view) {
      py::object live =
          py::cast(static_cast<Handle*>(op->binding_view), py::return_value_policy::reference);
      if (has_view) state->sched.release_view(op);  // the live handle holds a view: never the last
      return live;
    }
    return py::cast(new Handle(state, op, has_view), py::return_value_policy::take_ownership);
  }

  py::object decision() {
    state_->sched.check_not_inherited();
    Decision d = op_->load_decision();
    if (d != Decision::kNone) state_->sched.deliver(op_);
    return decision_obj(d);
  }

  py::object wait(py::handle timeout) {
    state_->sched.check_not_inherited();
    double seconds = 0;
    const bool bounded = to_timeout(timeout, &seconds);
    const auto end = bounded ? deadline_after(seconds) : Clock::time_point::max();
    for (;;) {
      Decision d = op_->load_decision();
      if (d != Decision::kNone) {
        state_->sched.deliver(op_);
        return decision_obj(d);
      }
      if (state_->sched.closed() || Clock::now() >= end) return py::none();
      // Wait in slices so Ctrl-C (PyErr_CheckSignals) works during long waits.
      const auto slice = std::min(end, Clock::now() + std::chrono::milliseconds(50));
      {
        py::gil_scoped_release nogil;
        state_->sched.wait_decision(op_, slice);
      }
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    }
  }

  void mark_complete(py::handle error, bool by_engine = false) {
    if (error.is_none()) {
      state_->sched.mark_complete(op_, true, {}, by_engine);
      return;
    }
    std::string msg;
    if (PyExceptionInstance_Check(error.ptr())) {
      msg = Py_TYPE(error.ptr())->tp_name;
      // The message is a courtesy: an exception whose __str__ fails still fails the operation.
      try {
        msg += ": " + message_text(py::str(error).ptr());
      } catch (py::error_already_set&) {
        msg += " (its str() raised)";
      }
    } else if (PyUnicode_Check(error.ptr())) {
      msg = message_text(error.ptr());
    } else {
      throw py::type_error("error must be None, an exception or a str");
    }
    if (msg.empty()) msg = "failed";
    state_->sched.mark_complete(op_, false, msg, by_engine);
  }
  void claim_transfer() { state_->sched.claim_transfer(op_); }
  // asyncio (kvsched/scheduler.py): 0 watching, 1 already decided, 2 another notifier watches.
  int watch(const std::shared_ptr<AsyncNotifier>& notifier, uint64_t token) {
    switch (state_->sched.watch(op_, notifier, token)) {
      case Scheduler::WatchResult::kWatching: return 0;
      case Scheduler::WatchResult::kDecided: return 1;
      case Scheduler::WatchResult::kBusy: return 2;
    }
    return 2;
  }
  // The token `notifier` watches this op with, or None (another notifier, or not set yet).
  py::object watched_by(const std::shared_ptr<AsyncNotifier>& notifier) {
    // order: acquire — pairs with the seq_cst store of kWatchSet in Scheduler::watch().
    if (op_->watch_state.load(std::memory_order_acquire) == Op::kWatchSet &&
        op_->notifier == notifier)
      return py::int_(op_->watch_token);
    return py::none();
  }
  void release_transfer_claim() { state_->sched.release_transfer_claim(op_); }

  py::object uuid() {
    if (!uuid_obj_) uuid_obj_ = from_uuid(op_->uuid);
    return uuid_obj_;
  }
  const std::string& request_id() const { return op_->rid; }
  std::string outcome() const {
    switch (op_->load_outcome()) {
      case Outcome::kOpen: return "open";
      case Outcome::kCompleted: return "completed";
      case Outcome::kFailed: return "failed";
      case Outcome::kCancelled: return "cancelled";
    }
    return "open";
  }
  bool is_immediate() const { return op_->mode == Mode::kImmediate; }
  bool closed() const { return state_->sched.inherited() || state_->sched.closed(); }
  const OpPtr& op() const { return op_; }

 private:
  StatePtr state_;
  OpPtr op_;
  py::object uuid_obj_;
};

struct WorkerSide {
  StatePtr s;
};
struct TransferSide {
  StatePtr s;
};

}  // namespace
