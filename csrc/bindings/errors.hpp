// The one path from a core::Error to its kvsched.errors class: used by the pybind11 exception
// translator and by the vectorcall methods alike.
// Part of the binding module's one translation unit: included by module.cpp only, so its
// definitions live in an anonymous namespace like the rest of the module.
#pragma once

#include "convert.hpp"

namespace py = pybind11;
using namespace kvsched::core;

namespace {

bool set_core_error() noexcept {
  try {
    throw;
  } catch (const Error& e) {
    PyObject* cls = PyExc_RuntimeError;
    try {
      auto& errors = refs().errors;  // first use imports kvsched.errors, which could fail
      auto it = errors.find(static_cast<int>(e.code()));
      if (it != errors.end()) cls = it->second.ptr();
    } catch (...) {
      PyErr_Clear();
    }
    PyErr_SetString(cls, e.what());
    return true;
  } catch (...) {
    return false;
  }
}

}  // namespace
