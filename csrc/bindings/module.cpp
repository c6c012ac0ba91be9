// pybind11 bindings of the core: the narrow boundary between Python and C++.
//
// This file only declares the module `kvsched._core`: its classes, methods and exception
// translation. The jobs are in their own headers: convert.hpp (Python values <-> core values),
// core_state.hpp (the shared scheduler), handle.hpp (handle lifetime and waits), errors.hpp (one
// error-mapping path), fast_calls.hpp (the per-operation vectorcall methods). The benchmark entry
// points are a separate extension (csrc/bench/bench_module.cpp: kvsched._bench).
//
// GIL rules: every core call is made with the GIL held except wait/poll, which release it. The
// core never calls into Python, so no core lock is ever held while a thread waits for the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "convert.hpp"
#include "core_state.hpp"
#include "errors.hpp"
#include "fast_calls.hpp"
#include "handle.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvsched C++ core (private: use kvsched.Scheduler)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error&) {
      set_core_error();  // the same mapping as the vectorcall methods (errors.hpp)
    }
  });

  py::class_<Handle>(m, "Handle", "A decided-or-pending transfer operation (contract section 3).")
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

  py::class_<WorkerSide>(m, "WorkerSide", "The worker half of a scheduler (contract section 3).")
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
             if (bounded && seconds == 0) {
               // A non-blocking try: nothing waits, so the GIL stays held (releasing and taking
               // it back cost more than the try itself).
               ops = t.s->sched.poll(static_cast<size_t>(n), Clock::time_point::min());
               py::list out;
               for (auto& op : ops) out.append(Handle::wrap(t.s, op, /*has_view=*/true));
               return out;
             }
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
             // its one wait (joining the deadline thread, woken first) is short (contract S9, docs/contract.md).
             s.sched.close();
           })
      .def_property_readonly("closed",
                             [](CoreState& s) { return s.sched.inherited() || s.sched.closed(); })
      .def_property_readonly("inherited", [](CoreState& s) { return s.sched.inherited(); });
}
