// pybind11 bindings of the core: the narrow boundary between Python and C++.
//
// What lives here and nowhere else: converting Python values (uuids, requirements, enums) into
// core values, mapping core::Error to the exception classes of kvsched/errors.py, releasing the
// GIL around blocking waits, and the user-facing Handle object with drop detection.
//
// GIL rules: every core call below is made with the GIL held except wait/poll, which
// release it. The core never calls into Python, so no core lock is ever held while a thread
// waits for the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "../bench/core_bench.hpp"
#include "fast_methods.hpp"
#include "../core/scheduler.hpp"

namespace py = pybind11;
using namespace kvsched::core;

namespace {

// Python-side objects looked up once (kvsched.errors, kvsched.protocol, uuid, logging).
struct PyRefs {
  py::object uuid_cls, protocol, decision_cls, slot_status_cls;
  py::object enum_base, transfer_kind_cls, request_mode_cls;
  py::object layer_complete, layer_name_complete, iteration_complete;
  py::object decision_execute, decision_cancel;
  py::object on_dropped;  // kvsched.scheduler._log_dropped
  std::unordered_map<int, py::object> errors;
};

PyRefs& refs() {
  // Leaked on purpose: Python objects must not be destroyed after the interpreter finalises.
  static PyRefs* r = [] {
    auto* p = new PyRefs();
    p->uuid_cls = py::module_::import("uuid").attr("UUID");
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

// Text for a message, from any str: lone surrogates become \udXXX escapes; never fails.
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

// Converts with the request id named in any error message (SPEC S8).
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
  return refs().uuid_cls(py::arg("int") = value);
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

// The user-facing handle of one operation (SPEC section 3). At most one Handle object exists per
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

// ------------------------------------------------------------------------------------------------
// The per-operation calls, on CPython's vectorcall convention (see fast_methods.hpp for why).
// Each does exactly what a pybind11 method with the same signature would do.

namespace kb = kvsched::bindings;

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

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvsched C++ core (private: use kvsched.Scheduler)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::object cls = refs().errors.at(static_cast<int>(e.code()));
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  m.def("_bench_core",
        [](long ops, int threads) {
          if (ops < 1 || threads < 1 || threads > 64)
            invalid("_bench_core: ops >= 1 and 1 <= threads <= 64");
          kvsched::bench::CoreBenchResult r;
          {
            py::gil_scoped_release nogil;
            r = kvsched::bench::run_core_bench(ops, threads);
          }
          return py::make_tuple(r.ops, r.seconds);
        },
        py::arg("ops"), py::arg("threads") = 1,
        "Run the core benchmark loop without Python on `threads` threads sharing one scheduler; "
        "returns (ops done, seconds).");
  m.def("_spin",
        [](double seconds) {
          // Busy CPU work with the GIL released: the simulated layer compute of kvsched-bench.
          py::gil_scoped_release nogil;
          const auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(seconds));
          volatile uint64_t x = 0;
          while (Clock::now() < end)
            for (int i = 0; i < 256; ++i) x = x + static_cast<uint64_t>(i);
        },
        py::arg("seconds"), "Busy-wait on the CPU for `seconds` with the GIL released.");

  py::class_<Handle>(m, "Handle", "A decided-or-pending transfer operation (SPEC section 3).")
      .def_property_readonly("request_id", &Handle::request_id)
      .def_property_readonly("uuid", &Handle::uuid)
      .def_property_readonly("outcome", &Handle::outcome,
                             "'open', 'completed', 'failed' or 'cancelled'.")
      .def_property_readonly("immediate", &Handle::is_immediate)
      .def("wait", &Handle::wait, py::arg("timeout") = py::none(),
           "Block (GIL released) until decided; returns the Decision, or None on timeout/close.")
      .def("_closed", &Handle::closed)
      // The transfer engine's seam (kvsched.transfer): one engine copies an op, only while it
      // is open, and only that engine marks it (Scheduler::claim_transfer).
      .def("_claim_transfer", &Handle::claim_transfer)
      .def("_release_transfer_claim", &Handle::release_transfer_claim)
      .def("_watch", &Handle::watch, py::arg("notifier"), py::arg("token"))
      .def("_watched_by", &Handle::watched_by, py::arg("notifier"))
      .def("_engine_mark",
           [](Handle& h, py::handle error) { h.mark_complete(error, /*by_engine=*/true); },
           py::arg("error") = py::none())
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](Handle& h, py::handle, py::handle exc, py::handle) {
             // A CANCEL handle has nothing to mark (its operation ended cancelled), and one a
             // TransferEngine copies is marked by that engine when the copy ends.
             if (h.op()->load_decision() == Decision::kCancel) return false;
             // order: acquire — pairs with the acq_rel CAS in Scheduler::claim_transfer().
             if (h.op()->marker.load(std::memory_order_acquire) == Op::kMarkerEngine) return false;
             if (exc.is_none()) {
               h.mark_complete(exc);  // a misuse (undecided, marked twice) raises ProtocolError
               return false;
             }
             // The body raised: record the failure if the handle can take it, but never replace
             // the body's exception with ours.
             try {
               h.mark_complete(exc);
             } catch (const std::exception&) {
             }
             return false;
           })
      .def("__repr__", [](Handle& h) {
        Decision d = h.op()->load_decision();
        const char* ds = d == Decision::kExecute ? "EXECUTE" : d == Decision::kCancel ? "CANCEL" : "None";
        return "<kvsched.Handle request_id=" + py::repr(py::str(h.request_id())).cast<std::string>() +
               " uuid=" + h.op()->uuid.str() + " decision=" + ds + " outcome=" + h.outcome() + ">";
      });

  py::class_<AsyncNotifier, std::shared_ptr<AsyncNotifier>>(
      m, "AsyncNotifier",
      "One event loop's wake-up channel: the core posts the tokens of decided operations and "
      "makes `fd` readable (core/async_notifier.hpp).")
      .def(py::init<>())
      .def_property_readonly("fd", &AsyncNotifier::fd)
      .def("drain", &AsyncNotifier::drain, "Tokens posted since the last drain (never blocks).");

  py::class_<WorkerSide>(m, "WorkerSide", "The worker half of a scheduler (SPEC section 3).")
      .def("enqueue_many",
           [](WorkerSide& w, py::handle rid, py::handle uuids, py::handle kind, py::handle mode) {
             // All or nothing: values converted here, then the core checks every element before
             // it applies any (duplicates within the batch included).
             std::string r = to_rid(rid);
             std::vector<Uuid> us = to_uuid_list(uuids, r);
             const Kind k = to_kind(kind, r, us.empty() ? nullptr : &us[0]);
             const Mode md = to_mode(mode, r, us.empty() ? nullptr : &us[0]);
             w.s->sched.enqueue_many(r, us, k, md);
           },
           py::arg("rid"), py::arg("uuids"), py::arg("kind"), py::arg("mode") = 0)
      .def("start_next_iteration", [](WorkerSide& w) { return w.s->sched.start_next_iteration(); })
      .def("mark_layer_complete",
           [](WorkerSide& w, py::handle layer) {
             w.s->sched.mark_layer_complete(w.s->to_layer(layer));
           },
           py::arg("layer"))
      .def("mark_iteration_complete", [](WorkerSide& w) { w.s->sched.mark_iteration_complete(); })
      .def("is_complete", [](WorkerSide& w, py::handle rid) { return w.s->sched.is_complete(to_rid(rid)); },
           py::arg("rid"))
      .def("take_finished", [](WorkerSide& w) { return w.s->sched.take_finished(); })
      .def("slot_status",
           [](WorkerSide& w, py::handle rid) {
             SlotSnapshot snap = w.s->sched.slot_status(to_rid(rid));
             py::list errors;
             for (auto& e : snap.errors) errors.append(py::make_tuple(from_uuid(e.first), e.second));
             return refs().slot_status_cls(py::arg("expected") = snap.expected,
                                           py::arg("completed") = snap.completed,
                                           py::arg("failed") = snap.failed,
                                           py::arg("cancelled") = snap.cancelled,
                                           py::arg("errors") = errors);
           },
           py::arg("rid"))
      .def("cancel_slot", [](WorkerSide& w, py::handle rid) { w.s->sched.cancel_slot(to_rid(rid)); },
           py::arg("rid"));

  py::class_<TransferSide>(m, "TransferSide", "The leader / transfer half of a scheduler.")
      .def("schedule_many",
           [](TransferSide& t, py::handle rid, py::handle uuids, py::handle requirement,
              py::handle mode) {
             std::string r = to_rid(rid);
             std::vector<Uuid> us = to_uuid_list(uuids, r);
             const Uuid* first = us.empty() ? nullptr : &us[0];
             const Mode md = to_mode(mode, r, first);
             uint64_t req = with_context(r, first, [&] { return t.s->to_requirement(requirement); });
             std::vector<OpPtr> ops = t.s->sched.schedule_many(r, us, req, md);
             py::list out;
             for (auto& op : ops) out.append(Handle::wrap(t.s, op));
             return out;
           },
           py::arg("rid"), py::arg("uuids"), py::arg("requirement") = py::none(),
           py::arg("mode") = 0)
      .def("poll",
           [](TransferSide& t, py::handle max_items, py::handle timeout) {
             const int64_t n = to_small_int(max_items, "max_items", 1, int64_t{1} << 40);
             double seconds = 0;
             const bool bounded = to_timeout(timeout, &seconds);
             const auto end = bounded ? deadline_after(seconds) : Clock::time_point::max();
             std::vector<OpPtr> ops;
             for (;;) {
               const auto slice = std::min(end, Clock::now() + std::chrono::milliseconds(50));
               {
                 py::gil_scoped_release nogil;
                 ops = t.s->sched.poll(static_cast<size_t>(n), slice);
               }
               if (!ops.empty() || t.s->sched.closed() || Clock::now() >= end) break;
               if (PyErr_CheckSignals() != 0) throw py::error_already_set();
             }
             py::list out;
             for (auto& op : ops) out.append(Handle::wrap(t.s, op, /*has_view=*/true));
             return out;
           },
           py::arg("max_items") = 64, py::arg("timeout") = 0.0);

  // The per-operation calls (fast_methods.hpp).
  kb::add_method(m.attr("WorkerSide"), &kCreateSlotDef);
  kb::add_method(m.attr("WorkerSide"), &kRemoveSlotDef);
  kb::add_method(m.attr("WorkerSide"), &kEnqueueDef);
  kb::add_method(m.attr("TransferSide"), &kScheduleDef);
  kb::add_method(m.attr("Handle"), &kMarkCompleteDef);
  kb::add_getter(m.attr("Handle"), &kDecisionDef);

  py::class_<CoreState, StatePtr>(m, "Core")
      .def(py::init([](int64_t max_inflight, uint64_t num_layers, double op_timeout_s,
                       size_t removed_memory, size_t poll_backlog, double store_starvation_s,
                       std::vector<std::string> layer_names) {
             Config c;
             c.max_inflight = max_inflight;
             c.num_layers = num_layers;
             // Whole nanoseconds, rounded up so that a positive duration never becomes 0
             // ("never"); Scheduler.__init__ keeps both in [1e-9 or 0, 1e9] s.
             c.op_timeout_ns = static_cast<int64_t>(std::ceil(op_timeout_s * 1e9));
             c.removed_memory = removed_memory;
             c.poll_backlog = poll_backlog;
             c.store_starvation_ns = static_cast<int64_t>(std::ceil(store_starvation_s * 1e9));
             refs();  // import the Python-side classes now, not in a destructor later
             auto st = std::make_shared<CoreState>(c);
             for (size_t i = 0; i < layer_names.size(); ++i) st->layer_index[layer_names[i]] = i;
             return st;
           }),
           py::arg("max_inflight"), py::arg("num_layers"), py::arg("op_timeout_s"),
           py::arg("removed_memory"), py::arg("poll_backlog"), py::arg("store_starvation_s"),
           py::arg("layer_names"))
      .def_property_readonly("worker", [](const StatePtr& s) { return WorkerSide{s}; })
      .def_property_readonly("transfer", [](const StatePtr& s) { return TransferSide{s}; })
      .def("stats",
           [](CoreState& s) {
             s.sched.check_not_inherited();
             return s.sched.stats();
           })
      .def("close",
           [](CoreState& s) {
             // A forked child's copy: nothing of it is ours to close (fork_guard.hpp); closing
             // is a no-op there so cleanup code (atexit, `with`) never hangs or raises.
             if (s.sched.inherited()) return;
             // With the GIL held on purpose: every other non-blocking call of the bindings also
             // holds it, so close() cannot land between the core deciding an op inside
             // schedule() and the Handle object (its view) being created, where close() would
             // see an undelivered EXECUTE op nobody holds and fail it as dropped. Safe: the core
             // never waits for Python, so no thread it joins or wakes needs the GIL to finish;
             // its one wait (joining the deadline thread, woken first) is short (SPEC S9).
             s.sched.close();
           })
      .def_property_readonly("closed",
                             [](CoreState& s) { return s.sched.inherited() || s.sched.closed(); })
      .def_property_readonly("inherited", [](CoreState& s) { return s.sched.inherited(); });
}
