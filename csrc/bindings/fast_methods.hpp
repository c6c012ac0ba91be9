// Methods that bypass pybind11's generic dispatcher, for the calls an engine makes once per
// operation (enqueue, schedule, mark_complete, decision, create/remove slot).
//
// Why: pybind11 dispatches every call through one generic routine (argument vectors, overload
// resolution, casters). Measured on the 2-core development machine, a pybind11 method that does
// nothing costs about 225 ns more than a CPython builtin method with the same arguments, which
// is more than the core's own work per call. These methods use CPython's vectorcall convention
// (METH_FASTCALL | METH_KEYWORDS) directly and are installed on the pybind11 classes as ordinary
// method descriptors, so `w.enqueue(...)` binds and type-checks `self` as any method does.
//
// Contract: the body receives the C++ object and the arguments by parameter name (nullptr for an
// omitted optional one); argument misuse raises TypeError with Python's wording; a C++ exception
// escaping the body becomes a Python error: the core's errors their kvsched.errors class, pybind11's
// and Python's own exceptions themselves, MemoryError for bad_alloc, RuntimeError for the rest.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstddef>
#include <new>
#include <string>

namespace kvsched::bindings {

namespace py = pybind11;

// Converts the exception in flight into the Python error indicator. `on_core_error` handles the
// core's own exception type (it knows the kvsched.errors classes); it returns false for others.
using CoreErrorHandler = bool (*)() noexcept;

inline void set_python_error(CoreErrorHandler on_core_error) noexcept {
  try {
    throw;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (...) {
    if (on_core_error()) return;
    try {
      throw;
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (...) {
      PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception");
    }
  }
}

// Matches vectorcall arguments to parameter names, as Python does for a def with positional-or-
// keyword parameters: the first `required` are mandatory.
template <size_t N>
std::array<PyObject*, N> parse_args(const char* fn, const std::array<const char*, N>& names,
                                    size_t required, PyObject* const* args, Py_ssize_t nargs,
                                    PyObject* kwnames) {
  std::array<PyObject*, N> out{};
  if (static_cast<size_t>(nargs) > N)
    throw py::type_error(std::string(fn) + "() takes at most " + std::to_string(N) +
                         (N == 1 ? " argument (" : " arguments (") + std::to_string(nargs) +
                         " given)");
  for (Py_ssize_t i = 0; i < nargs; ++i) out[static_cast<size_t>(i)] = args[i];
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* key = PyTuple_GET_ITEM(kwnames, k);
    size_t j = 0;
    while (j < N && PyUnicode_CompareWithASCIIString(key, names[j]) != 0) ++j;
    if (j == N)
      throw py::type_error(std::string(fn) + "() got an unexpected keyword argument '" +
                           py::str(key).cast<std::string>() + "'");
    if (out[j])
      throw py::type_error(std::string(fn) + "() got multiple values for argument '" +
                           names[j] + "'");
    out[j] = args[nargs + k];
  }
  for (size_t j = 0; j < required; ++j)
    if (!out[j])
      throw py::type_error(std::string(fn) + "() missing required argument '" + names[j] + "'");
  return out;
}

// Installs `def` (static storage: CPython keeps the pointer) as a method of the pybind11 class.
inline void add_method(py::handle cls, PyMethodDef* def) {
  PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(cls.ptr()), def);
  if (!descr) throw py::error_already_set();
  cls.attr(def->ml_name) = py::reinterpret_steal<py::object>(descr);
}

// Installs `def` (static storage) as a read-only property of the pybind11 class.
inline void add_getter(py::handle cls, PyGetSetDef* def) {
  PyObject* descr = PyDescr_NewGetSet(reinterpret_cast<PyTypeObject*>(cls.ptr()), def);
  if (!descr) throw py::error_already_set();
  cls.attr(def->name) = py::reinterpret_steal<py::object>(descr);
}

}  // namespace kvsched::bindings
