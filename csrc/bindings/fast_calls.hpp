// The per-operation calls on CPython's vectorcall convention (fast_methods.hpp says why) and
// their method definitions.
// Part of the binding module's one translation unit: included by module.cpp only, so its
// definitions live in an anonymous namespace like the rest of the module.
#pragma once

#include "errors.hpp"
#include "fast_methods.hpp"
#include "handle.hpp"

namespace py = pybind11;
using namespace kvsched::core;

namespace {

// ------------------------------------------------------------------------------------------------
// The per-operation calls, on CPython's vectorcall convention (see fast_methods.hpp for why).
// Each does exactly what a pybind11 method with the same signature would do.

namespace kb = kvsched::bindings;

template <class T>
T& self_as(PyObject* self) {
  return py::cast<T&>(py::handle(self));
}

// Runs a method body; a C++ exception escaping it becomes the Python error (and nullptr).
template <class Body>
PyObject* guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (...) {
    kb::set_python_error(set_core_error);
    return nullptr;
  }
}

PyObject* fast_create_slot(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kw) {
  return guarded([&]() -> PyObject* {
    auto a = kb::parse_args<1>("create_slot", {"rid"}, 1, args, nargs, kw);
    self_as<WorkerSide>(self).s->sched.create_slot(to_rid(a[0]));
    Py_RETURN_NONE;
  });
}

PyObject* fast_remove_slot(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kw) {
  return guarded([&]() -> PyObject* {
    auto a = kb::parse_args<1>("remove_slot", {"rid"}, 1, args, nargs, kw);
    self_as<WorkerSide>(self).s->sched.remove_slot(to_rid(a[0]));
    Py_RETURN_NONE;
  });
}

PyObject* fast_enqueue(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kw) {
  return guarded([&]() -> PyObject* {
    auto a = kb::parse_args<4>("enqueue", {"rid", "uuid", "kind", "mode"}, 3, args, nargs, kw);
    WorkerSide& w = self_as<WorkerSide>(self);
    const std::string r = to_rid(a[0]);
    const Uuid u = to_uuid(a[1], r);
    const Kind k = to_kind(a[2], r, &u);
    const Mode md = a[3] ? to_mode(a[3], r, &u) : Mode::kScheduled;
    w.s->sched.enqueue(r, u, k, md);
    Py_RETURN_NONE;
  });
}

PyObject* fast_schedule(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kw) {
  return guarded([&]() -> PyObject* {
    auto a = kb::parse_args<4>("schedule", {"rid", "uuid", "requirement", "mode"}, 2, args, nargs,
                               kw);
    TransferSide& t = self_as<TransferSide>(self);
    const std::string r = to_rid(a[0]);
    const Uuid u = to_uuid(a[1], r);
    const Mode md = a[3] ? to_mode(a[3], r, &u) : Mode::kScheduled;
    const uint64_t req =
        a[2] ? with_context(r, &u, [&] { return t.s->to_requirement(a[2]); }) : 0;
    return Handle::wrap(t.s, t.s->sched.schedule(r, u, req, md)).release().ptr();
  });
}

PyObject* fast_mark_complete(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                             PyObject* kw) {
  return guarded([&]() -> PyObject* {
    auto a = kb::parse_args<1>("mark_complete", {"error"}, 0, args, nargs, kw);
    self_as<Handle>(self).mark_complete(a[0] ? py::handle(a[0]) : py::handle(Py_None));
    Py_RETURN_NONE;
  });
}

PyObject* fast_decision(PyObject* self, void*) {
  return guarded([&]() -> PyObject* { return self_as<Handle>(self).decision().release().ptr(); });
}

template <PyObject* (*Fn)(PyObject*, PyObject* const*, Py_ssize_t, PyObject*)>
PyCFunction as_cfunction() {
  // The cast CPython's own modules use for METH_FASTCALL | METH_KEYWORDS functions.
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(Fn));
}

constexpr int kFast = METH_FASTCALL | METH_KEYWORDS;
// CPython keeps pointers to these: static storage. The "$self, ...\n--\n\n" prefix gives
// inspect.signature() the parameters.
PyMethodDef kCreateSlotDef{"create_slot", as_cfunction<fast_create_slot>(), kFast,
                           "create_slot($self, rid)\n--\n\nOpen the slot of request `rid`."};
PyMethodDef kRemoveSlotDef{"remove_slot", as_cfunction<fast_remove_slot>(), kFast,
                           "remove_slot($self, rid)\n--\n\nForget a complete slot."};
PyMethodDef kEnqueueDef{"enqueue", as_cfunction<fast_enqueue>(), kFast,
                        "enqueue($self, rid, uuid, kind, mode=0)\n--\n\n"
                        "The worker half of operation `uuid` of request `rid`."};
PyMethodDef kScheduleDef{"schedule", as_cfunction<fast_schedule>(), kFast,
                         "schedule($self, rid, uuid, requirement=None, mode=0)\n--\n\n"
                         "The transfer half of operation `uuid`; returns its Handle at once."};
PyMethodDef kMarkCompleteDef{
    "mark_complete", as_cfunction<fast_mark_complete>(), kFast,
    "mark_complete($self, error=None)\n--\n\n"
    "End the operation: completed, or failed when `error` (exception or str) is given."};
PyGetSetDef kDecisionDef{"decision", fast_decision, nullptr,
                         "Decision.EXECUTE / Decision.CANCEL, or None while undecided.", nullptr};

}  // namespace
