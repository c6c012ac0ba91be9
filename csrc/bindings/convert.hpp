// Python values to core values and back: uuids, request ids, integers, enums, requirements'
// texts and timeouts, each refused with a TypeError or an InvalidArgumentError that names the
// argument (docs/semantics.md "Ranges"). Also the Python objects the bindings look up once.
// Part of the binding module's one translation unit: included by module.cpp only, so its
// definitions live in an anonymous namespace like the rest of the module.
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "../core/scheduler.hpp"

namespace py = pybind11;
using namespace kvsched::core;

namespace {

// Python-side objects looked up once (kvsched.errors, kvsched.protocol, uuid, logging).
struct PyRefs {
  py::object uuid_cls, protocol, decision_cls, slot_status_cls;
  py::object object_new, uuid_safe_unknown, str_int, str_is_safe;  // for from_uuid()
  py::object enum_base, transfer_kind_cls, request_mode_cls;
  py::object layer_complete, layer_name_complete, iteration_complete;
  py::object decision_execute, decision_cancel;
  py::object on_dropped;  // kvsched._logging.log_dropped
  std::unordered_map<int, py::object> errors;
};

PyRefs& refs() {
  // Leaked on purpose: Python objects must not be destroyed after the interpreter finalises.
  static PyRefs* r = [] {
    auto* p = new PyRefs();
    p->uuid_cls = py::module_::import("uuid").attr("UUID");
    p->object_new = py::module_::import("builtins").attr("object").attr("__new__");
    p->uuid_safe_unknown = py::module_::import("uuid").attr("SafeUUID").attr("unknown");
    p->str_int = py::str("int");
    p->str_is_safe = py::str("is_safe");
    p->protocol = py::module_::import("kvsched.protocol");
    p->decision_cls = p->protocol.attr("Decision");
    p->enum_base = py::module_::import("enum").attr("Enum");
    p->transfer_kind_cls = p->protocol.attr("TransferKind");
    p->request_mode_cls = p->protocol.attr("RequestMode");
    p->slot_status_cls = p->protocol.attr("SlotStatus");
    p->layer_complete = p->protocol.attr("LayerComplete");
    p->layer_name_complete = p->protocol.attr("LayerNameComplete");
    p->iteration_complete = p->protocol.attr("IterationComplete");
    p->decision_execute = p->decision_cls.attr("EXECUTE");
    p->decision_cancel = p->decision_cls.attr("CANCEL");
    py::module_ errors = py::module_::import("kvsched.errors");
    p->errors[static_cast<int>(ErrorCode::kSlotExists)] = errors.attr("SlotExistsError");
    p->errors[static_cast<int>(ErrorCode::kUnknownSlot)] = errors.attr("UnknownSlotError");
    p->errors[static_cast<int>(ErrorCode::kSlotBusy)] = errors.attr("SlotBusyError");
    p->errors[static_cast<int>(ErrorCode::kDuplicate)] = errors.attr("DuplicateOperationError");
    p->errors[static_cast<int>(ErrorCode::kProtocol)] = errors.attr("ProtocolError");
    p->errors[static_cast<int>(ErrorCode::kClosed)] = errors.attr("SchedulerClosedError");
    p->errors[static_cast<int>(ErrorCode::kInvalidArgument)] = errors.attr("InvalidArgumentError");
    p->errors[static_cast<int>(ErrorCode::kForked)] = errors.attr("SchedulerForkedError");
    p->on_dropped = py::module_::import("kvsched._logging").attr("log_dropped");
    return p;
  }();
  return *r;
}

[[noreturn]] void invalid(const std::string& msg) { throw Error(ErrorCode::kInvalidArgument, msg); }

// The UTF-8 bytes of a str. False for a str UTF-8 cannot encode (a lone surrogate such as
// '\ud800'): such a value can name no request, uuid or layer, and the caller refuses it.
bool utf8_view(PyObject* o, std::string_view* out) {
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);  // cached by the str: valid while it lives
  if (!s) {
    PyErr_Clear();
    return false;
  }
  *out = std::string_view(s, static_cast<size_t>(n));
  return true;
}
bool utf8_of(PyObject* o, std::string* out) {
  std::string_view v;
  if (!utf8_view(o, &v)) return false;
  out->assign(v.data(), v.size());
  return true;
}

// Text for a message, from any str: a lone surrogate becomes an escape such as \ud800; never
// fails.
std::string message_text(PyObject* o) {
  std::string out;
  if (utf8_of(o, &out)) return out;
  py::object b = py::reinterpret_steal<py::object>(
      PyUnicode_AsEncodedString(o, "utf-8", "backslashreplace"));
  if (!b) {
    PyErr_Clear();
    return "(unprintable text)";
  }
  return std::string(PyBytes_AS_STRING(b.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(b.ptr())));
}

int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// uuid: a uuid.UUID, its 16 bytes, or any string form uuid.UUID() accepts.
Uuid to_uuid_impl(py::handle obj);

template <class F>
auto with_context(const std::string& rid, const Uuid* uuid, F&& f) -> decltype(f()) {
  // The prefix is built only on the error path: formatting a uuid costs more than the call.
  auto where = [&] {
    return "request '" + cut_text(rid, kMaxQuotedBytes) + "'" +
           (uuid ? " op " + uuid->str() : std::string()) + ": ";
  };
  try {
    return f();
  } catch (const Error& e) {
    throw Error(e.code(), where() + e.what());
  } catch (const py::type_error& e) {
    throw py::type_error(where() + e.what());
  }
}

// Converts with the request id named in any error message (contract S8, docs/contract.md).
Uuid to_uuid(py::handle obj, const std::string& rid) {
  return with_context(rid, nullptr, [&] { return to_uuid_impl(obj); });
}

Uuid to_uuid_impl(py::handle obj) {
  Uuid u;
  PyObject* o = obj.ptr();
  if (PyBytes_Check(o)) {
    if (PyBytes_GET_SIZE(o) != 16)
      invalid("uuid bytes must be 16 long, got " + std::to_string(PyBytes_GET_SIZE(o)));
    const auto* b = reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(o));
    for (int i = 0; i < 8; ++i) u.hi = (u.hi << 8) | b[i];
    for (int i = 8; i < 16; ++i) u.lo = (u.lo << 8) | b[i];
    return u;
  }
  if (PyUnicode_Check(o)) {
    std::string_view v;
    if (!utf8_view(o, &v)) invalid("malformed uuid string (not encodable as UTF-8)");
    // Fast path: the canonical 36-character form and the 32 bare hex digits, parsed here.
    if (v.size() == 36 || v.size() == 32) {
      int digits = 0;
      bool ok = true;
      for (size_t i = 0; i < v.size() && ok; ++i) {
        const char c = v[i];
        if (v.size() == 36 && (i == 8 || i == 13 || i == 18 || i == 23)) {
          ok = c == '-';
          continue;
        }
        int h = hexval(c);
        if (h < 0) {
          ok = false;
          break;
        }
        if (digits < 16) u.hi = (u.hi << 4) | static_cast<uint64_t>(h);
        else u.lo = (u.lo << 4) | static_cast<uint64_t>(h);
        ++digits;
      }
      if (ok && digits == 32) return u;
    }
    // Every other form uuid.UUID() accepts ("urn:uuid:...", braces, other hyphenation) is
    // parsed by uuid.UUID itself, so the two never disagree on what a uuid string is.
    PyObject* parsed = PyObject_CallOneArg(refs().uuid_cls.ptr(), o);
    if (!parsed) {
      PyErr_Clear();
      invalid("malformed uuid string '" + cut_text(std::string(v), 80) + "'");
    }
    py::object holder = py::reinterpret_steal<py::object>(parsed);
    return to_uuid_impl(holder);
  }
  if (PyObject_IsInstance(o, refs().uuid_cls.ptr()) == 1) {
    static PyObject* int_name = PyUnicode_InternFromString("int");
    py::object value = py::reinterpret_steal<py::object>(PyObject_GetAttr(o, int_name));
    if (!value || !PyLong_Check(value.ptr())) throw py::type_error("uuid.UUID without an int value");
    unsigned char b[16];
    // Big-endian, unsigned: the 16 bytes of the uuid (the signature grew an argument in 3.13).
#if PY_VERSION_HEX >= 0x030D0000
    int rc = _PyLong_AsByteArray(reinterpret_cast<PyLongObject*>(value.ptr()), b, 16, 0, 0, 1);
#else
    int rc = _PyLong_AsByteArray(reinterpret_cast<PyLongObject*>(value.ptr()), b, 16, 0, 0);
#endif
    if (rc < 0) throw py::error_already_set();
    for (int i = 0; i < 8; ++i) u.hi = (u.hi << 8) | b[i];
    for (int i = 8; i < 16; ++i) u.lo = (u.lo << 8) | b[i];
    return u;
  }
  throw py::type_error("uuid must be a uuid.UUID, 16 bytes or a str, not " +
                       std::string(Py_TYPE(o)->tp_name));
}

py::object from_uuid(const Uuid& u) {
  py::int_ hi(u.hi), lo(u.lo);
  py::object value = (hi << py::int_(64)) | lo;
  // The object uuid.UUID(int=value) makes, without running UUID.__init__'s argument checks in
  // Python (the core's value is a 128-bit int by construction): UUID.__init__ itself ends with
  // object.__setattr__ of its two slots, `int` and `is_safe` (SafeUUID.unknown). Engines read
  // handle uuids on their hot paths (job names, notification tags).
  const PyRefs& r = refs();
  py::object obj = r.object_new(r.uuid_cls);
  if (PyObject_GenericSetAttr(obj.ptr(), r.str_int.ptr(), value.ptr()) != 0 ||
      PyObject_GenericSetAttr(obj.ptr(), r.str_is_safe.ptr(), r.uuid_safe_unknown.ptr()) != 0)
    throw py::error_already_set();
  return obj;
}

std::string to_rid(py::handle obj) {
  if (!PyUnicode_Check(obj.ptr()))
    throw py::type_error("request id must be a str, not " +
                         std::string(Py_TYPE(obj.ptr())->tp_name));
  std::string_view rid;
  if (!utf8_view(obj.ptr(), &rid))
    invalid("request id " + cut_text(message_text(obj.ptr()), kMaxQuotedBytes) +
            " is not encodable as UTF-8 (it contains a lone surrogate)");
  return std::string(rid);
}

// A batch of uuids: a list, tuple or other iterable of uuids (not a str or bytes, which would
// iterate over characters).
std::vector<Uuid> to_uuid_list(py::handle obj, const std::string& rid) {
  if (PyUnicode_Check(obj.ptr()) || PyBytes_Check(obj.ptr()))
    throw py::type_error("request '" + cut_text(rid, kMaxQuotedBytes) +
                         "': uuids must be an iterable of uuids, not a single " +
                         Py_TYPE(obj.ptr())->tp_name);
  PyObject* it = PyObject_GetIter(obj.ptr());
  if (!it) {
    PyErr_Clear();
    throw py::type_error("request '" + cut_text(rid, kMaxQuotedBytes) +
                         "': uuids must be an iterable of uuids, not " + Py_TYPE(obj.ptr())->tp_name);
  }
  py::object iter = py::reinterpret_steal<py::object>(it);
  std::vector<Uuid> out;
  while (PyObject* item = PyIter_Next(iter.ptr())) {
    py::object held = py::reinterpret_steal<py::object>(item);
    out.push_back(to_uuid(held, rid));
  }
  if (PyErr_Occurred()) throw py::error_already_set();
  return out;
}

// An integer in [lo, hi]: an int, an IntEnum, or anything else with __index__ (numpy integers),
// the same way everywhere; never a bool (True is not a layer) or a float.
int64_t to_small_int(py::handle obj, const char* what, int64_t lo, int64_t hi) {
  PyObject* o = obj.ptr();
  if (PyLong_CheckExact(o)) {  // the common case: a plain int, no __index__ round trip
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (!overflow && v >= lo && v <= hi) return v;
  }
  if (PyBool_Check(o) || PyFloat_Check(o) ||
      (!PyLong_Check(o) && !(Py_TYPE(o)->tp_as_number && Py_TYPE(o)->tp_as_number->nb_index)))
    throw py::type_error(std::string(what) + " must be an int, not " + Py_TYPE(o)->tp_name);
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  if (!index) {
    // A broken __index__ (it raised): a TypeError naming the argument, not the raw error.
    PyErr_Clear();
    throw py::type_error(std::string(what) + " must be an int (" + Py_TYPE(o)->tp_name +
                         ".__index__ failed)");
  }
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    overflow = 1;
  }
  if (overflow || v < lo || v > hi) {
    std::string shown;
    if (!overflow) {
      shown = std::to_string(v);
    } else {
      py::int_ zero(0);
      shown = PyObject_RichCompareBool(index.ptr(), zero.ptr(), Py_LT) == 1 ? "below -2**63"
                                                                           : "above 2**63-1";
    }
    invalid(std::string(what) + " out of range [" + std::to_string(lo) + ", " +
            std::to_string(hi) + "]: " + shown);
  }
  return v;
}

// An enum argument: its own enum's members or plain integers; a member of another enum
// (Decision.EXECUTE as a mode, a RequestMode as a kind) is a TypeError, not its integer value.
int64_t to_enum_value(py::handle obj, const py::object& cls, const char* what) {
  // Fast paths first (every enqueue passes a kind): a member of the right enum, or a plain int.
  if (Py_TYPE(obj.ptr()) == reinterpret_cast<PyTypeObject*>(cls.ptr()) ||
      PyLong_CheckExact(obj.ptr()))
    return to_small_int(obj, what, 0, 1);
  if (PyObject_IsInstance(obj.ptr(), refs().enum_base.ptr()) == 1 &&
      PyObject_IsInstance(obj.ptr(), cls.ptr()) != 1)
    throw py::type_error(std::string(what) + " must be a " +
                         py::str(cls.attr("__name__")).cast<std::string>() + ", not " +
                         py::repr(obj).cast<std::string>());
  return to_small_int(obj, what, 0, 1);
}

Kind to_kind(py::handle obj, const std::string& rid, const Uuid* u) {
  return with_context(rid, u, [&] {
    return static_cast<Kind>(to_enum_value(obj, refs().transfer_kind_cls, "kind (TransferKind)"));
  });
}
Mode to_mode(py::handle obj, const std::string& rid, const Uuid* u) {
  return with_context(rid, u, [&] {
    return static_cast<Mode>(to_enum_value(obj, refs().request_mode_cls, "mode (RequestMode)"));
  });
}

py::object decision_obj(Decision d) {
  if (d == Decision::kExecute) return refs().decision_execute;
  if (d == Decision::kCancel) return refs().decision_cancel;
  return py::none();
}

Clock::time_point deadline_after(double seconds) {
  if (seconds <= 0) return Clock::now();
  if (seconds > 1e9) seconds = 1e9;
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(seconds));
}

// The longest finite wait accepted: 1e9 s (about 31.7 years) is far below where a deadline of
// steady_clock (int64 nanoseconds since boot) would overflow, so every accepted timeout is
// honoured as given. Longer ones are refused; inf means "no timeout", as None does.
constexpr double kMaxWaitSeconds = 1e9;

// Converts a Python timeout (None, or seconds: int, float, numpy scalar) into an optional wait.
bool to_timeout(py::handle timeout, double* seconds) {
  if (timeout.is_none()) return false;
  PyObject* o = timeout.ptr();
  const bool is_index = !PyFloat_Check(o) && Py_TYPE(o)->tp_as_number &&
                        Py_TYPE(o)->tp_as_number->nb_index;
  const bool is_float = PyFloat_Check(o) ||
                        (!is_index && Py_TYPE(o)->tp_as_number && Py_TYPE(o)->tp_as_number->nb_float);
  if (PyBool_Check(o) || !(is_index || is_float))
    throw py::type_error(std::string("timeout must be None or a number of seconds, not ") +
                         Py_TYPE(o)->tp_name);
  py::object number = py::reinterpret_steal<py::object>(is_index ? PyNumber_Index(o)
                                                                 : PyNumber_Float(o));
  if (!number) {
    PyErr_Clear();
    throw py::type_error(std::string("timeout must be None or a number of seconds (") +
                         Py_TYPE(o)->tp_name + " did not convert)");
  }
  double s = PyLong_Check(number.ptr()) ? PyLong_AsDouble(number.ptr())
                                        : PyFloat_AsDouble(number.ptr());
  if (s == -1.0 && PyErr_Occurred()) {  // an int beyond a double's range
    PyErr_Clear();
    invalid("timeout out of range: at most 1e9 seconds, inf or None");
  }
  if (std::isnan(s) || s < 0)
    invalid("timeout must be >= 0 seconds, inf or None, got " +
            cut_text(py::repr(timeout).cast<std::string>(), 80));
  if (std::isinf(s)) return false;
  if (s > kMaxWaitSeconds)
    invalid("timeout out of range: at most 1e9 seconds (about 31.7 years), inf or None, got " +
            cut_text(py::repr(timeout).cast<std::string>(), 80));
  *seconds = s;
  return true;
}

}  // namespace
