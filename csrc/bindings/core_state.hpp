// CoreState: the one scheduler that a Handle, a WorkerSide and a TransferSide share (each keeps
// it alive), with the layer-name table and requirement conversion; leaked in a forked child.
// Part of the binding module's one translation unit: included by module.cpp only, so its
// definitions live in an anonymous namespace like the rest of the module.
#pragma once

#include "convert.hpp"

namespace py = pybind11;
using namespace kvsched::core;

namespace {

// Everything a Handle, WorkerSide and TransferSide share; kept alive by all of them.
struct CoreState {
  explicit CoreState(const Config& c) : owned(std::make_unique<Scheduler>(c)), sched(*owned) {}
  ~CoreState() {
    // In a forked child the scheduler is a copy whose mutexes may be held by parent threads that
    // do not exist here and whose deadline thread is not ours to join: destroying it could hang
    // (core/fork_guard.hpp). Leaked on purpose; the child's memory is its own to drop at exit.
    if (sched.inherited()) (void)owned.release();
  }
  std::unique_ptr<Scheduler> owned;
  Scheduler& sched;
  std::unordered_map<std::string, uint64_t> layer_index;

  uint64_t to_requirement(py::handle req) {
    if (req.is_none()) return 0;
    PyRefs& r = refs();
    if (py::isinstance(req, r.layer_complete)) {
      auto layer = to_small_int(req.attr("layer"), "LayerComplete.layer", 0,
                                static_cast<int64_t>(kMaxLayer));
      auto it = to_small_int(req.attr("iteration"), "LayerComplete.iteration", 0,
                             static_cast<int64_t>(kMaxIteration));
      const uint64_t n = sched.config().num_layers;
      if (n != 0 && static_cast<uint64_t>(layer) >= n)
        invalid("LayerComplete.layer " + std::to_string(layer) + " out of range (" +
                std::to_string(n) + " layers)");
      return layer_requirement(static_cast<uint64_t>(layer), static_cast<uint64_t>(it));
    }
    if (py::isinstance(req, r.layer_name_complete)) {
      py::object name = req.attr("name");
      if (!PyUnicode_Check(name.ptr())) throw py::type_error("LayerNameComplete.name must be a str");
      std::string n;
      if (!utf8_of(name.ptr(), &n)) n = message_text(name.ptr());  // found nowhere below
      auto found = layer_index.find(n);
      if (found == layer_index.end())
        invalid("unknown layer name '" + cut_text(n, kMaxQuotedBytes) + "'");
      auto it = to_small_int(req.attr("iteration"), "LayerNameComplete.iteration", 0,
                             static_cast<int64_t>(kMaxIteration));
      return layer_requirement(found->second, static_cast<uint64_t>(it));
    }
    if (py::isinstance(req, r.iteration_complete)) {
      auto it = to_small_int(req.attr("iteration"), "IterationComplete.iteration", 0,
                             static_cast<int64_t>(kMaxIteration));
      return iteration_requirement(static_cast<uint64_t>(it));
    }
    throw py::type_error(
        "requirement must be None, LayerComplete, LayerNameComplete or IterationComplete, not " +
        std::string(Py_TYPE(req.ptr())->tp_name));
  }

  uint64_t to_layer(py::handle layer) {
    if (PyUnicode_Check(layer.ptr())) {
      std::string n;
      if (!utf8_of(layer.ptr(), &n)) n = message_text(layer.ptr());  // found nowhere below
      auto found = layer_index.find(n);
      if (found == layer_index.end())
        invalid("unknown layer name '" + cut_text(n, kMaxQuotedBytes) + "'");
      return found->second;
    }
    return static_cast<uint64_t>(
        to_small_int(layer, "layer", 0, static_cast<int64_t>(kMaxLayer)));
  }
};

using StatePtr = std::shared_ptr<CoreState>;

}  // namespace
