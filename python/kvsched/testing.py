"""A pure-Python stand-in for ``kvsched.Scheduler``, for unit tests (contract S1-S12 in
docs/contract.md; docs/semantics.md).

``ReferenceScheduler`` has the public surface of :class:`kvsched.Scheduler` (contract section 3:
``worker``, ``transfer``, handles with ``wait``/``await``/``with``/``mark_complete``, ``poll``,
``stats()``, ``close()``) and follows the same rules, without the C++ core. Use it in your own
unit tests where a real scheduler is unwanted, for instance to step a connector's logic one call
at a time in a debugger::

    from kvsched.testing import ReferenceScheduler

    with ReferenceScheduler(max_inflight=4) as s:
        s.worker.create_slot("r1")
        ...

It also accepts a ``TransferEngine`` (``kvsched.TransferEngine(s, backend="host")``). It is
not for production: every call takes one lock, so it is orders of magnitude slower than the core.

Within kvsched it is the executable statement of the contract that the C++ core is tested
against (the spec tests and the differential model test run both), and the performance
baseline the benchmark reports as ``reference_ops_per_s``. It is written to be obviously
correct, not fast:

* one ``threading.RLock`` guards every table; one ``Condition`` on it wakes blocking waits;
* every public call validates all of its arguments and preconditions before it changes
  anything, so a call that raises leaves the model as it was (S8);
* deadlines (``op_timeout``) and drop detection are processed lazily at the start of every
  call, and by a small daemon timer thread (so ``await h`` and idle programs see them too);
* a handle's ``__del__`` never takes the lock (it may run inside a locked section of any
  thread during garbage collection): it only appends to a deque that the next call drains.

Counters in ``stats()``: ``scheduled``/``enqueued`` count accepted transfer/worker halves;
``executed`` counts EXECUTE decisions (both modes); ``completed``/``failed``/``cancelled``
count operation ends, with ``dropped`` included in ``failed`` and ``timed_out`` included in
``cancelled``. Held outcomes (an IMMEDIATE outcome, or a CANCEL, for a transfer half whose
worker half has not come) are kept until the worker half arrives: IMMEDIATE outcomes without
bound, held cancels at most ``removed_memory`` (each held once, oldest forgotten first).

Readings of what the contract and docs/semantics.md leave open: deadlines and cancellation apply to
SCHEDULED operations only (an IMMEDIATE one is run by the transfer engine already);
``take_finished`` lists a rid at most once per call, and only if it is still complete then
(a later completion reports it again); a second ``mark_iteration_complete`` is a
ProtocolError; the uuid alone keys an operation, so a worker half whose uuid another slot
already enqueued is a DuplicateOperationError.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import numbers
import threading
import time
import uuid as _uuid
import weakref

from .errors import (DuplicateOperationError, HandleDroppedError, InvalidArgumentError,
                     KvschedError, ProtocolError, SchedulerClosedError, SlotBusyError,
                     SlotExistsError, UnknownSlotError)
from .protocol import (Decision, IterationComplete, LayerComplete, LayerNameComplete,
                       RequestMode, SlotStatus, TransferKind)

__all__ = ["ReferenceScheduler", "ReferenceHandle"]

_log = logging.getLogger("kvsched")
_MAX_LAYER = 2**24 - 2          # layer indexes are below this always (docs/semantics.md)
_MAX_ITERATION = 2**40          # iteration numbers are below this always (docs/semantics.md)
_NO_REQ_KEY = (-1, -1)          # "no requirement" sorts first and is always satisfied
_SLICE = 0.05                   # blocking waits and the timer wake this often
EXECUTE, CANCEL = Decision.EXECUTE, Decision.CANCEL
SCHEDULED, IMMEDIATE = RequestMode.SCHEDULED, RequestMode.IMMEDIATE


# ----------------------------------------------------------------------------- validation
def _ctx(rid, u):
    return f"operation {u} of request {rid!r}"


def _check_rid(rid):
    if not isinstance(rid, str):
        raise TypeError(f"request id must be str, got {type(rid).__name__}: {rid!r}")


def _parse_uuid(value, rid):
    """uuid.UUID, its 16 bytes or its string; the error names the request (S8)."""
    if isinstance(value, _uuid.UUID):
        return value
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _uuid.UUID(bytes=bytes(value))
        if isinstance(value, str):
            return _uuid.UUID(value)
    except ValueError:
        raise InvalidArgumentError(f"malformed uuid {value!r} for request {rid!r}") from None
    raise TypeError(f"uuid must be uuid.UUID, 16 bytes or str, got {type(value).__name__} "
                    f"(request {rid!r})")


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _enum(value, cls, what, ctx):
    if isinstance(value, cls):
        return value
    if not _is_int(value):
        raise TypeError(f"{what} must be {cls.__name__}, got {type(value).__name__} ({ctx})")
    try:
        return cls(int(value))
    except ValueError:
        raise InvalidArgumentError(f"{what} {value!r} is not a {cls.__name__} ({ctx})") from None


def _index(value, what, ctx, limit=2**63 - 1):
    if not _is_int(value):
        raise TypeError(f"{what} must be int, got {type(value).__name__} ({ctx})")
    if not 0 <= value < limit:
        raise InvalidArgumentError(f"{what} {value} out of range [0, {limit}) ({ctx})")
    return int(value)


def _describe(exc):
    """'Type: message' of an exception; an exception whose str() raises still fails its op."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001
        return f"{type(exc).__name__} (its str() raised)"


def _timeout(value, what="timeout"):
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{what} must be a number of seconds or None, got {type(value).__name__}")
    if not value >= 0:  # also rejects NaN
        raise InvalidArgumentError(f"{what} must be >= 0 seconds or None, got {value!r}")
    return float(value)


def _wake(fut):
    if not fut.done():
        fut.set_result(None)


# ----------------------------------------------------------------------------- records
class _Op:
    """One operation, keyed by uuid. state: waiting (a half is missing), gated, ready,
    executing, ended. ``outcome`` is set once, when it ends (S4)."""

    __slots__ = ("uuid", "rid", "mode", "kind", "req_key", "slot", "has_worker",
                 "has_transfer", "decision", "outcome", "message", "handle", "state",
                 "ready_at", "holds_token", "waiters")

    def __init__(self, u, rid, mode):
        self.uuid, self.rid, self.mode = u, rid, mode
        self.kind = self.slot = self.decision = self.outcome = self.message = None
        self.handle = self.waiters = None
        self.req_key = _NO_REQ_KEY
        self.has_worker = self.has_transfer = self.holds_token = False
        self.state, self.ready_at = "waiting", 0.0


class _Slot:
    __slots__ = ("rid", "ops", "expected", "completed", "failed", "cancelled", "errors",
                 "cancelled_flag")

    def __init__(self, rid):
        self.rid, self.ops, self.errors = rid, {}, []
        self.expected = self.completed = self.failed = self.cancelled = 0
        self.cancelled_flag = False

    def complete(self):
        return self.completed + self.failed + self.cancelled == self.expected


# ----------------------------------------------------------------------------- handle
class ReferenceHandle:
    """The transfer side's view of one operation. The scheduler keeps a strong reference
    until the decision is delivered (wait / await / decision / poll); after that only the
    caller holds it, and ``__del__`` of an unmarked EXECUTE handle records a drop (S4)."""

    __slots__ = ("_sched", "_op", "_released", "__weakref__")

    def __init__(self, sched, op):
        self._sched, self._op, self._released = sched, op, False

    request_id = property(lambda self: self._op.rid, doc="the request id (str)")
    uuid = property(lambda self: self._op.uuid, doc="the operation's uuid.UUID")

    @property
    def decision(self):
        """None until decided; reading a decided value delivers it."""
        return self._sched._deliver(self)

    def wait(self, timeout=None):
        """Block (GIL released) until decided; the Decision, or None on timeout."""
        return self._sched._wait(self, _timeout(timeout))

    def mark_complete(self, error=None):
        """End an EXECUTE operation: completed, or failed when ``error`` (exception or str)."""
        if not (error is None or isinstance(error, (str, BaseException))):
            raise TypeError(f"error must be an exception, a str or None, got "
                            f"{type(error).__name__} ({_ctx(self._op.rid, self._op.uuid)})")
        self._sched._mark(self, error)

    def __enter__(self):
        return self

    def __exit__(self, et, exc, tb):
        if self._op.decision is CANCEL:
            return False  # nothing to mark: the operation ended cancelled
        if exc is None:
            self.mark_complete()
        else:
            try:
                self.mark_complete(error=exc)
            except KvschedError:
                pass  # the body's exception is the one the caller needs to see
        return False

    def __await__(self):
        return self._sched._await(self).__await__()

    def __del__(self):
        try:
            op = self._op
            if self._released and op.decision is EXECUTE and op.outcome is None:
                self._sched._drops.append(op)  # deque.append is atomic; no lock here
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self):
        d = self._op.decision
        return f"<ReferenceHandle {self._op.uuid} rid={self._op.rid!r} " \
               f"decision={d.name if d else None} outcome={self._op.outcome}>"


# ----------------------------------------------------------------------------- sides
class _Worker:
    """The worker side (inside the GPU process): slots, worker halves, progress."""

    def __init__(self, s):
        self._s = s

    def create_slot(self, rid):
        _check_rid(rid)
        s = self._s
        with s._lock:
            s._enter(f"request {rid!r}")
            if rid in s._slots:
                raise SlotExistsError(f"a slot for request {rid!r} already exists")
            s._slots[rid] = _Slot(rid)
            s._cancelled_rids.pop(rid, None)  # a new slot starts clean (S6)

    def enqueue(self, rid, uuid, kind, mode=SCHEDULED):
        _check_rid(rid)
        u = _parse_uuid(uuid, rid)
        ctx = _ctx(rid, u)
        kind = _enum(kind, TransferKind, "kind", ctx)
        mode = _enum(mode, RequestMode, "mode", ctx)
        s = self._s
        with s._lock:
            s._enter(ctx)
            slot = s._slots.get(rid)
            if slot is None:
                raise UnknownSlotError(f"enqueue of {ctx}: no slot for request {rid!r}")
            op = s._ops.get(u)
            if op is not None:
                if op.has_worker:
                    raise DuplicateOperationError(
                        f"{ctx}: the worker already enqueued it (for request {op.rid!r})")
                s._check_match(op, rid, mode, ctx)
            elif u in s._removed:  # its worker half came once already, for a removed slot
                raise DuplicateOperationError(
                    f"{ctx}: the uuid belongs to an operation of a removed slot")
            # -- validated; mutate
            if op is None:
                op = s._new_op(u, rid, mode)
            else:
                waiting = s._waiting_t.get(rid)
                if waiting is not None:
                    waiting.pop(u, None)
                    if not waiting:
                        del s._waiting_t[rid]
            op.has_worker, op.kind, op.slot = True, kind, slot
            slot.ops[u] = op
            slot.expected += 1
            s._stats["enqueued"] += 1
            if op.outcome is not None:  # held: IMMEDIATE ran already, or T half was cancelled
                s._credit(slot, op)
            elif op.mode is SCHEDULED and op.decision is None:
                if slot.cancelled_flag:
                    s._cancel(op)
                elif op.has_transfer:
                    s._join(op)

    def start_next_iteration(self):
        s = self._s
        with s._lock:
            s._enter("start_next_iteration")
            s._iteration += 1
            s._layers_done, s._iter_done = 0, False
            s._regate()
            return s._iteration

    def mark_layer_complete(self, layer):
        s = self._s
        if isinstance(layer, str):
            idx = s._layer_index.get(layer)
            if idx is None:
                raise InvalidArgumentError(f"unknown layer name {layer!r}")
        else:
            idx = _index(layer, "layer", "mark_layer_complete", _MAX_LAYER)
        with s._lock:
            s._enter("mark_layer_complete")
            it = s._iteration
            if it == 0 or s._iter_done:
                raise ProtocolError(f"mark_layer_complete({layer!r}) outside an iteration "
                                    f"(iteration {it}{', complete' if s._iter_done else ''})")
            if idx >= min(s._num_layers or _MAX_LAYER, _MAX_LAYER):
                raise ProtocolError(f"layer {idx} out of range (num_layers={s._num_layers})")
            if idx != s._layers_done:
                raise ProtocolError(f"layer {idx} marked complete in iteration {it}; "
                                    f"the next layer is {s._layers_done}")
            s._layers_done += 1
            s._regate()

    def mark_iteration_complete(self):
        s = self._s
        with s._lock:
            s._enter("mark_iteration_complete")
            if s._iteration == 0 or s._iter_done:
                raise ProtocolError(f"mark_iteration_complete outside an iteration "
                                    f"(iteration {s._iteration})")
            s._iter_done = True
            s._regate()

    def is_complete(self, rid):
        with self._s._lock:
            return self._slot(rid).complete()

    def slot_status(self, rid):
        with self._s._lock:
            sl = self._slot(rid)
            return SlotStatus(sl.expected, sl.completed, sl.failed, sl.cancelled, list(sl.errors))

    def take_finished(self):
        """Rids whose last open operation ended since the last call, each once per call; a
        rid that is incomplete again, removed or re-created by now is skipped (it will be
        reported when it completes). Cost: the number of completions, not of open slots."""
        s = self._s
        out = []
        with s._lock:
            s._enter("take_finished")
            while s._finished:
                rid, slot = s._finished.popitem(last=False)
                if s._slots.get(rid) is slot and slot.complete():
                    out.append(rid)
        return out

    def cancel_slot(self, rid):
        _check_rid(rid)
        s = self._s
        with s._lock:
            s._enter(f"request {rid!r}")
            slot = s._slots.get(rid)
            victims = list(slot.ops.values()) if slot else []
            # undecided SCHEDULED transfer halves without a worker half (see schedule())
            lone = list(s._waiting_t.pop(rid, {}).values())
            victims += lone
            if slot:
                slot.cancelled_flag = True
            for op in victims:
                if op.decision is None and op.mode is SCHEDULED:
                    s._cancel(op)
            for op in lone:  # held for a late worker half, bounded (never kept for ever)
                s._hold_cancel(op)
            s._cancelled_rids[rid] = True
            s._cancelled_rids.move_to_end(rid)
            if len(s._cancelled_rids) > max(s._removed_cap, 1):
                s._cancelled_rids.popitem(last=False)

    def remove_slot(self, rid):
        s = self._s
        with s._lock:
            slot = self._slot(rid)
            if not slot.complete():
                open_ = [str(u) for u, op in slot.ops.items() if op.outcome is None]
                raise SlotBusyError(f"request {rid!r} has {len(open_)} open operation(s): "
                                    f"{', '.join(open_[:4])}")
            del s._slots[rid]
            if s._finished.get(rid) is slot:
                del s._finished[rid]
            for u, op in slot.ops.items():
                if s._ops.get(u) is op:
                    del s._ops[u]
                s._remember_removed(u)

    def _slot(self, rid):
        _check_rid(rid)
        s = self._s
        with s._lock:
            s._enter(f"request {rid!r}")
            slot = s._slots.get(rid)
            if slot is None:
                raise UnknownSlotError(f"no slot for request {rid!r}")
            return slot


class _Transfer:
    """The leader / transfer side: transfer halves and the executors' poll."""

    def __init__(self, s):
        self._s = s

    def schedule(self, rid, uuid, requirement=None, mode=SCHEDULED):
        """Never blocks. Returns a handle; IMMEDIATE ones are decided EXECUTE already."""
        _check_rid(rid)
        u = _parse_uuid(uuid, rid)
        ctx = _ctx(rid, u)
        mode = _enum(mode, RequestMode, "mode", ctx)
        s = self._s
        key = s._req_key(requirement, ctx)
        with s._lock:
            s._enter(ctx)
            op = s._ops.get(u)
            if op is not None:
                if op.has_transfer:
                    raise DuplicateOperationError(f"{ctx}: the transfer side already scheduled it")
                s._check_match(op, rid, mode, ctx)
            detached = op is None and u in s._removed  # a late half of a removed slot
            if detached and mode is IMMEDIATE:
                # An IMMEDIATE op ends only through its transfer half, so this is its second one.
                raise DuplicateOperationError(
                    f"{ctx}: IMMEDIATE transfer half for an operation of a removed slot")
            # -- validated; mutate
            s._stats["scheduled"] += 1
            if detached:
                op = _Op(u, rid, mode)  # in no table: nothing of it can be credited
            elif op is None:
                op = s._new_op(u, rid, mode)
            op.has_transfer, op.req_key = True, key
            h = ReferenceHandle(s, op)
            op.handle = h
            if mode is IMMEDIATE:
                s._release(h)  # delivered at birth (docs: Handles and delivery)
                s._execute(op)
            elif detached:
                op.decision, op.outcome, op.state = CANCEL, "cancelled", "ended"
                s._publish(op)
            elif op.decision is not None:  # the worker half was cancelled or timed out
                s._publish(op)
            elif not op.has_worker and rid in s._cancelled_rids:
                s._cancel(op)
                s._hold_cancel(op)  # held once, and never listed as waiting
            elif op.has_worker:
                s._join(op)
            else:
                # Undecided SCHEDULED half waiting for its worker half: the only kind that
                # cancel_slot() cancels and holds, and op_timeout times out. An IMMEDIATE half
                # (running already) and a held cancel are never listed here, so a later
                # cancel_slot() cannot hold them (again) and push real held cancels out.
                s._waiting_t.setdefault(rid, {})[u] = op
            return h

    def poll(self, max_items=64, timeout=0.0):
        """Decided, undelivered SCHEDULED handles, oldest first, each once."""
        if not _is_int(max_items):
            raise TypeError(f"max_items must be int, got {type(max_items).__name__}")
        if max_items < 1:
            raise InvalidArgumentError(f"max_items must be >= 1, got {max_items}")
        timeout = _timeout(timeout)
        s = self._s
        end = None if timeout is None else time.monotonic() + timeout
        with s._lock:
            s._enter("poll")
            while not s._pollq and not s._closed:
                left = _SLICE if end is None else min(end - time.monotonic(), _SLICE)
                if left <= 0:
                    break
                s._cond.wait(left)
                s._tick()
            out = []
            while s._pollq and len(out) < max_items:
                op, _ = s._pollq.popitem(last=False)
                h, op.handle = op.handle, None
                h._released = True
                out.append(h)
            return out


# ----------------------------------------------------------------------------- scheduler
def _timer_main(ref, stop):
    """Runs deadlines and drop detection while nobody calls in (e.g. during ``await h``).
    Holds only a weak reference, so an unclosed scheduler can still be collected."""
    while not stop.wait(_SLICE):
        s = ref()
        if s is None:
            return
        with s._lock:
            s._tick()
        del s


class ReferenceScheduler:
    """Pure-Python scheduler with the public surface of contract section 3 (docs/contract.md)."""

    def __init__(self, max_inflight=64, layer_names=None, op_timeout=None, *, num_layers=None,
                 removed_memory=65536, poll_backlog=65536, store_starvation_s=0.05):
        names = list(layer_names) if layer_names is not None else []
        if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError("layer_names must be distinct str")
        if layer_names is not None:
            if num_layers is not None and num_layers != len(names):
                raise ValueError(f"num_layers={num_layers} but {len(names)} layer_names")
            num_layers = len(names)
        for name, v, lo in (("max_inflight", max_inflight, 1), ("removed_memory", removed_memory, 0),
                            ("poll_backlog", poll_backlog, 1),
                            ("num_layers", 1 if num_layers is None else num_layers, 1)):
            if not _is_int(v):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v!r}")
        op_timeout = _timeout(op_timeout, "op_timeout")
        self._max_inflight, self._num_layers, self._op_timeout = int(max_inflight), num_layers, op_timeout
        self._layer_index = {n: i for i, n in enumerate(names)}
        self._removed_cap, self._backlog_cap = int(removed_memory), int(poll_backlog)
        self._starvation = _timeout(store_starvation_s, "store_starvation_s")
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._ops = {}                                # uuid -> _Op (live, held, or of a live slot)
        self._slots = {}                              # rid -> _Slot
        self._waiting_t = {}                          # rid -> {uuid: _Op}: undecided SCHEDULED
        #                                               T halves without W half
        self._cancelled_rids = collections.OrderedDict()  # until create_slot (bounded)
        self._removed = collections.OrderedDict()     # uuids of removed slots, FIFO, bounded
        self._held = collections.deque()              # _Op: held cancels, FIFO, bounded
        self._finished = collections.OrderedDict()    # rid -> _Slot that completed
        self._pollq = collections.OrderedDict()       # _Op -> None, decided and undelivered
        self._drops = collections.deque()             # _Op whose delivered handle died unmarked
        self._ready = {TransferKind.LOAD: [], TransferKind.STORE: []}  # heaps (key, seq, op)
        self._gated = []                              # heap (key, seq, op)
        self._deadlines = []                          # heap (deadline, seq, op)
        self._seq = itertools.count()
        self._iteration, self._layers_done, self._iter_done = 0, 0, False
        self._inflight = self._peak = self._forgotten = self._evicted = 0
        self._latency = collections.deque(maxlen=4096)
        self._stats = dict.fromkeys(("scheduled", "enqueued", "executed", "completed", "failed",
                                     "cancelled", "dropped", "timed_out"), 0)
        self.worker, self.transfer = _Worker(self), _Transfer(self)
        self._stop = threading.Event()
        self._timer = threading.Thread(target=_timer_main, args=(weakref.ref(self), self._stop),
                                       name="kvsched-reference-timer", daemon=True)
        self._timer.start()

    # -- public ---------------------------------------------------------------------------
    def stats(self):
        with self._lock:
            self._tick()
            lat = sorted(self._latency) or [0.0]

            def pct(q):
                return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6

            return dict(self._stats, inflight=self._inflight, peak_inflight=self._peak,
                        max_inflight=self._max_inflight, removed_memory_size=len(self._removed),
                        removed_memory=self._removed_cap, removed_forgotten=self._forgotten,
                        slots=len(self._slots), poll_backlog=len(self._pollq),
                        poll_evicted=self._evicted, closed=self._closed,
                        dispatch_latency_us={"p50": pct(0.5), "p99": pct(0.99)})

    def close(self):
        """Decide every undecided operation CANCEL, wake every waiter; idempotent."""
        with self._lock:
            if not self._closed:
                for op in list(self._ops.values()):
                    if op.decision is None:
                        self._cancel(op)
                self._closed = True
                # Nobody can poll() any more: let go of every queued handle, so an EXECUTE one
                # that nobody else holds is recorded as dropped (docs/semantics.md).
                while self._pollq:
                    op, _ = self._pollq.popitem(last=False)
                    h, op.handle = op.handle, None
                    if h is not None:
                        h._released = True
                    del h
                self._tick()
                self._cond.notify_all()
        self._stop.set()
        if self._timer is not threading.current_thread():
            self._timer.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- internals (all called with the lock held) ------------------------------------------
    def _enter(self, what):
        self._tick()
        if self._closed:
            raise SchedulerClosedError(f"scheduler is closed ({what})")

    def _tick(self):
        """Lazy housekeeping: dropped handles, then deadlines."""
        while self._drops:
            op = self._drops.popleft()
            if op.decision is EXECUTE and op.outcome is None:
                msg = (f"{HandleDroppedError.__name__}: the handle of {_ctx(op.rid, op.uuid)} was "
                       f"garbage-collected without mark_complete")
                _log.warning(msg)
                self._stats["dropped"] += 1
                self._end(op, "failed", msg)
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            op = heapq.heappop(self._deadlines)[2]
            # only an op missing a half or its requirement times out, never one awaiting a token
            if op.decision is None and op.state in ("waiting", "gated"):
                what = "its requirement" if op.state == "gated" else \
                    ("its worker half" if op.has_transfer else "its transfer half")
                self._stats["timed_out"] += 1
                self._cancel(op, f"{_ctx(op.rid, op.uuid)} timed out after "
                                 f"{self._op_timeout:g} s waiting for {what}")
                if op.has_transfer and not op.has_worker:  # held for a late worker half, bounded
                    waiting = self._waiting_t.get(op.rid)
                    if waiting is not None:
                        waiting.pop(op.uuid, None)
                        if not waiting:
                            del self._waiting_t[op.rid]
                    self._hold_cancel(op)

    def _new_op(self, u, rid, mode):
        op = _Op(u, rid, mode)
        self._ops[u] = op
        if self._op_timeout is not None and mode is SCHEDULED:
            heapq.heappush(self._deadlines, (time.monotonic() + self._op_timeout, next(self._seq), op))
        return op

    def _check_match(self, op, rid, mode, ctx):
        if op.rid != rid:
            raise ProtocolError(f"{ctx}: the other half names request {op.rid!r}")
        if op.mode != mode:
            raise ProtocolError(f"{ctx}: halves disagree on mode ({op.mode.name} vs {mode.name})")

    def _req_key(self, req, ctx):
        """(iteration, layer) priority and gating key; IterationComplete sorts after its layers."""
        if req is None:
            return _NO_REQ_KEY
        if isinstance(req, LayerComplete):
            layer = _index(req.layer, "layer", ctx, _MAX_LAYER)
            if self._num_layers and layer >= self._num_layers:
                raise InvalidArgumentError(f"layer {layer} out of range ({self._num_layers} "
                                           f"layers) ({ctx})")
            return (_index(req.iteration, "iteration", ctx, _MAX_ITERATION), layer)
        if isinstance(req, LayerNameComplete):
            if not isinstance(req.name, str):
                raise TypeError(f"layer name must be str, got {type(req.name).__name__} ({ctx})")
            if req.name not in self._layer_index:
                raise InvalidArgumentError(f"unknown layer name {req.name!r} ({ctx})")
            return (_index(req.iteration, "iteration", ctx, _MAX_ITERATION),
                    self._layer_index[req.name])
        if isinstance(req, IterationComplete):
            return (_index(req.iteration, "iteration", ctx, _MAX_ITERATION), float("inf"))
        raise TypeError(f"requirement must be LayerComplete, LayerNameComplete, IterationComplete "
                        f"or None, got {type(req).__name__} ({ctx})")

    def _satisfied(self, key):
        # Satisfied keys form a prefix of (iteration, layer) order, which lets _regate use a heap.
        i, k = key
        it = self._iteration
        return i < it or (i == it and (self._iter_done or k < self._layers_done))

    def _join(self, op):
        """Both halves of a SCHEDULED op are present: gate it or make it ready."""
        if self._satisfied(op.req_key):
            self._make_ready(op)
        else:
            op.state = "gated"
            heapq.heappush(self._gated, (op.req_key, next(self._seq), op))

    def _regate(self):
        while self._gated and self._satisfied(self._gated[0][0]):
            op = heapq.heappop(self._gated)[2]
            if op.state == "gated" and op.decision is None:
                self._make_ready(op)

    def _make_ready(self, op):
        op.state, op.ready_at = "ready", time.monotonic()
        heapq.heappush(self._ready[op.kind], (op.req_key, next(self._seq), op))
        self._pump()

    def _pump(self):
        """Hand free tokens out (S3): a STORE starving at the head of its queue, else LOAD
        before STORE; within a kind the earlier requirement, then arrival order."""
        loads, stores = self._ready[TransferKind.LOAD], self._ready[TransferKind.STORE]
        while self._inflight < self._max_inflight and not self._closed:
            for q in (loads, stores):
                while q and q[0][2].state != "ready":
                    heapq.heappop(q)  # cancelled while waiting: lazy deletion
            if stores and (not loads or time.monotonic() - stores[0][2].ready_at > self._starvation):
                q = stores
            elif loads:
                q = loads
            else:
                return
            op = heapq.heappop(q)[2]
            self._latency.append(time.monotonic() - op.ready_at)
            self._execute(op)

    def _execute(self, op):
        op.decision, op.state = EXECUTE, "executing"
        self._stats["executed"] += 1
        if op.mode is SCHEDULED:
            op.holds_token = True
            self._inflight += 1
            self._peak = max(self._peak, self._inflight)
        self._publish(op)

    def _cancel(self, op, message=None):
        op.decision = CANCEL
        self._publish(op)
        self._end(op, "cancelled", message)

    def _publish(self, op):
        """A decision was made: queue the handle for poll, resolve awaits, wake waiters."""
        if op.handle is not None:
            self._pollq[op] = None
            if len(self._pollq) > self._backlog_cap:
                old, _ = self._pollq.popitem(last=False)
                self._evicted += 1
                h, old.handle = old.handle, None
                h._released = True  # if nobody else holds it, its __del__ records the drop
                del h
        for loop, fut in op.waiters or ():
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that event loop is closed
                pass
        op.waiters = None
        self._cond.notify_all()

    def _end(self, op, outcome, message=None):
        """The one place an operation ends (S4): exactly once, credited to its slot if the
        worker half exists, else held until it arrives."""
        op.outcome, op.message, op.state = outcome, message, "ended"
        self._stats[outcome] += 1
        if op.slot is not None:
            self._credit(op.slot, op)
        if op.holds_token:
            op.holds_token = False
            self._inflight -= 1
            self._pump()
        self._cond.notify_all()

    def _credit(self, slot, op):
        setattr(slot, op.outcome, getattr(slot, op.outcome) + 1)
        if op.message is not None:
            slot.errors.append((op.uuid, op.message))
        if slot.complete():
            self._finished[slot.rid] = slot

    def _hold_cancel(self, op):
        """A transfer half decided CANCEL before any worker half came (its rid was cancelled, or
        it timed out) waits in the table for its worker half; at most removed_memory of them (the
        oldest unjoined one is forgotten)."""
        self._held.append(op)  # by identity: a uuid may be held again once forgotten elsewhere
        while len(self._held) > max(self._removed_cap, 1):
            old = self._held.popleft()
            u = old.uuid
            if not old.has_worker and self._ops.get(u) is old:
                del self._ops[u]
                waiting = self._waiting_t.get(old.rid)
                if waiting is not None:
                    waiting.pop(u, None)
                    if not waiting:
                        del self._waiting_t[old.rid]

    def _remember_removed(self, u):
        self._removed[u] = None
        self._removed.move_to_end(u)
        while len(self._removed) > self._removed_cap:
            self._removed.popitem(last=False)
            self._forgotten += 1

    def _release(self, h):
        """The scheduler lets go of a handle: its decision is delivered (or evicted)."""
        if not h._released:
            h._released = True
            h._op.handle = None
            self._pollq.pop(h._op, None)

    def _deliver(self, h):
        with self._lock:
            self._tick()
            if h._op.decision is not None:
                self._release(h)
            return h._op.decision

    def _wait(self, h, timeout):
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                self._tick()
                if h._op.decision is not None:
                    self._release(h)
                    return h._op.decision
                left = _SLICE if end is None else min(end - time.monotonic(), _SLICE)
                if left <= 0:
                    return None
                self._cond.wait(left)

    async def _await(self, h):
        fut = None
        with self._lock:
            if h._op.decision is None:
                fut = asyncio.get_running_loop().create_future()
                h._op.waiters = (h._op.waiters or []) + [(fut.get_loop(), fut)]
        if fut is not None:
            await fut  # resolved through call_soon_threadsafe; the loop never blocks
        return self._deliver(h)

    def _mark(self, h, error):
        op = h._op
        ctx = _ctx(op.rid, op.uuid)
        with self._lock:
            self._tick()  # no closed check: executing copies may report after close()
            if op.decision is not EXECUTE:
                raise ProtocolError(f"mark_complete of {ctx}: decision is "
                                    f"{op.decision.name if op.decision else 'not made yet'}")
            if op.outcome is not None:
                raise ProtocolError(f"mark_complete of {ctx}: already ended ({op.outcome})")
            self._release(h)
            if error is None:
                self._end(op, "completed")
            else:
                text = error if isinstance(error, str) else _describe(error)
                self._end(op, "failed", text)
