"""Differential stateful test (STYLE.md B6): Hypothesis drives the C++ ``kvsched.Scheduler`` and the
pure-Python ``kvsched.testing.ReferenceScheduler`` side by side, one call at a time, and compares
after every step.

Rules: create_slot, enqueue (both modes, both kinds, every uuid form), schedule (no requirement,
LayerComplete, IterationComplete, LayerNameComplete; both modes), start_next_iteration,
mark_layer_complete (index or name), mark_iteration_complete, mark_complete (ok, error str,
error exception, ``with h:`` ok / raising, second mark, mark of a CANCEL or undecided handle),
delivery (``h.decision``, ``wait``, ``await``), poll, take_finished, cancel_slot, remove_slot,
close, dropping a handle (``del`` + ``gc.collect()``) and misuse (bad types and values on every
entry point; duplicate and mismatched halves, unknown slots, busy removes and double marks come
from the small pools of rids and uuids).

Compared after every step: every handle's decision and outcome (peeked through repr, which does
not deliver), every rid's slot_status (counters, error uuids and what the message says) and
is_complete (or the exception), the common stats counters, and every call's result or exception
class. A call that raises must raise the same class on both, name the rid and uuid in its
message, and leave its scheduler exactly as it was (S8). Invariants checked on each side: S4
``is_complete <=> completed + failed + cancelled == expected``, S2 gating (an EXECUTE decision
is only ever seen when the requirement holds in the progress this test drove), S3 token bound.

Where the two legitimately differ, the test does not compare (``take_finished`` multiplicity,
the order of handles decided by one call in ``poll``, the "scheduled"/"cancelled" stats
counters). Every disagreement the machine found was settled (docs/semantics.md) and is kept as a
small regression test in test_regressions.py; the machine no longer steers around any of them:
it re-uses removed slots' uuids on both sides, schedules transfer halves twice for cancelled rids,
re-cancels and re-creates rids with a memory of 1 or 2, marks undelivered handles, and uses
``with h:`` over CANCEL, undecided and already marked handles.

Configuration per example: max_inflight 1-3, with or without layer names, removed_memory 1, 2 or
65536, ``store_starvation_s`` huge (the starvation rule depends on wall time, so it would make
the two token orders differ by timing; it is tested in tests/spec), no op_timeout (timing).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import uuid

import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

import kvsched
from kvsched import (Decision, IterationComplete, LayerComplete, LayerNameComplete, RequestMode,
                     TransferKind)
from kvsched.errors import KvschedError
from kvsched.testing import ReferenceScheduler
from model_helpers import FIGURES, STRESS, classify, peek, write_report

# ci: ~20 s on 2 cores; long: 3000 programs of up to 150 steps take tens of minutes.
pytestmark = pytest.mark.timeout(120 if STRESS != "long" else 4 * 3600)

LOAD, STORE = TransferKind.LOAD, TransferKind.STORE
SCHEDULED, IMMEDIATE = RequestMode.SCHEDULED, RequestMode.IMMEDIATE

RIDS = ["r0", "r1", "r2"]
POOL = 6          # uuids in play at a time (small, so halves collide across rids and modes)


def fresh_uuid(i, gen):
    return uuid.uuid5(uuid.NAMESPACE_URL, f"kvsched-model-{i}-{gen}")


UUIDS = [fresh_uuid(i, 0) for i in range(POOL)]
NAMES = ["a", "b", "c"]
# stats() counters (tests/spec/spec_helpers.py). Each side must leave all of them unchanged when
# a call raises (S8); across sides only CROSS is compared: "scheduled" and "cancelled" differ by
# design for a late transfer half of a removed slot (the core counts it only in "late_cancelled":
# it is no operation of any slot; the reference counts it in both). A held cancel (a transfer
# half for a cancelled rid) is an operation and both count it as scheduled and cancelled. The per-slot counters, which are the contract, are compared exactly.
COUNTERS = ("scheduled", "enqueued", "executed", "completed", "failed", "cancelled", "dropped",
            "timed_out", "inflight", "peak_inflight", "max_inflight", "removed_memory_size")
CROSS = tuple(k for k in COUNTERS if k not in ("scheduled", "cancelled"))

UUID_FORMS = [
    ("UUID", lambda u: u),
    ("bytes", lambda u: u.bytes),
    ("str", str),
    ("hex", lambda u: u.hex),
    ("upper", lambda u: str(u).upper()),
    ("braces", lambda u: "{%s}" % u),
    ("urn", lambda u: u.urn),
]


class Boom(Exception):
    """Raised inside ``with h:`` bodies."""


def requirements():
    it = st.integers(0, 4)
    return st.one_of(
        st.none(),
        st.builds(LayerComplete, st.integers(0, 3), it),  # 3: out of range with 3 layer names
        st.builds(IterationComplete, it),
        st.builds(LayerNameComplete, st.sampled_from(NAMES), it),
    )


ENQUEUE_ARGS = dict(rid=st.sampled_from(RIDS), ui=st.integers(0, POOL - 1),
                    kind=st.sampled_from([LOAD, STORE]),
                    mode=st.sampled_from([SCHEDULED, IMMEDIATE]),
                    form=st.integers(0, len(UUID_FORMS) - 1), raw_ints=st.booleans(),
                    late=st.integers(0, 5))
SCHEDULE_ARGS = dict(rid=st.sampled_from(RIDS), ui=st.integers(0, POOL - 1),
                     req=requirements(), mode=st.sampled_from([SCHEDULED, IMMEDIATE]),
                     form=st.integers(0, len(UUID_FORMS) - 1), late=st.integers(0, 3))
MARK_ARGS = dict(hi=st.integers(0, 255),
                 how=st.sampled_from(["ok", "error str", "error exc", "with ok", "with raise"]))

# (what, call(sched) -> anything) pairs of deliberate misuse; every one must raise the same class
# on both implementations and change nothing. Rids/uuids of the pools so the state is real.
U0 = UUIDS[0]
BAD_CALLS = [
    ("create_slot rid int", lambda s: s.worker.create_slot(5)),
    ("create_slot rid None", lambda s: s.worker.create_slot(None)),
    ("create_slot rid bytes", lambda s: s.worker.create_slot(b"r0")),
    ("enqueue rid int", lambda s: s.worker.enqueue(7, U0, LOAD)),
    ("enqueue uuid int", lambda s: s.worker.enqueue("r0", 12345, LOAD)),
    ("enqueue uuid None", lambda s: s.worker.enqueue("r0", None, LOAD)),
    ("enqueue uuid float", lambda s: s.worker.enqueue("r0", 3.5, LOAD)),
    ("enqueue uuid 15 bytes", lambda s: s.worker.enqueue("r0", b"x" * 15, LOAD)),
    ("enqueue uuid 17 bytes", lambda s: s.worker.enqueue("r0", b"x" * 17, LOAD)),
    ("enqueue uuid malformed str", lambda s: s.worker.enqueue("r0", "not-a-uuid", LOAD)),
    ("enqueue uuid 31 hex digits", lambda s: s.worker.enqueue("r0", "0" * 31, LOAD)),
    ("enqueue uuid 33 hex digits", lambda s: s.worker.enqueue("r0", "0" * 33, LOAD)),
    ("enqueue uuid empty str", lambda s: s.worker.enqueue("r0", "", LOAD)),
    ("enqueue kind 7", lambda s: s.worker.enqueue("r0", U0, 7)),
    ("enqueue kind -1", lambda s: s.worker.enqueue("r0", U0, -1)),
    ("enqueue kind str", lambda s: s.worker.enqueue("r0", U0, "LOAD")),
    ("enqueue kind None", lambda s: s.worker.enqueue("r0", U0, None)),
    ("enqueue kind bool", lambda s: s.worker.enqueue("r0", U0, True)),
    ("enqueue kind float", lambda s: s.worker.enqueue("r0", U0, 1.0)),
    ("enqueue mode 2", lambda s: s.worker.enqueue("r0", U0, LOAD, mode=2)),
    ("enqueue mode str", lambda s: s.worker.enqueue("r0", U0, LOAD, mode="x")),
    ("schedule rid None", lambda s: s.transfer.schedule(None, U0)),
    ("schedule uuid int", lambda s: s.transfer.schedule("r0", 99)),
    ("schedule uuid malformed", lambda s: s.transfer.schedule("r0", "zz" * 16)),
    ("schedule mode 3", lambda s: s.transfer.schedule("r0", U0, mode=3)),
    ("schedule mode None", lambda s: s.transfer.schedule("r0", U0, mode=None)),
    ("schedule requirement object", lambda s: s.transfer.schedule("r0", U0, requirement=object())),
    ("schedule requirement int", lambda s: s.transfer.schedule("r0", U0, requirement=3)),
    ("schedule requirement tuple", lambda s: s.transfer.schedule("r0", U0, requirement=(0, 1))),
    ("LayerComplete layer -1", lambda s: s.transfer.schedule("r0", U0, requirement=LayerComplete(-1, 1))),
    ("LayerComplete iteration -1", lambda s: s.transfer.schedule("r0", U0, requirement=LayerComplete(0, -1))),
    ("LayerComplete layer str", lambda s: s.transfer.schedule("r0", U0, requirement=LayerComplete("a", 1))),
    ("LayerComplete layer float", lambda s: s.transfer.schedule("r0", U0, requirement=LayerComplete(0.5, 1))),
    ("LayerComplete iteration None", lambda s: s.transfer.schedule("r0", U0, requirement=LayerComplete(0, None))),
    ("LayerComplete layer 2**64", lambda s: s.transfer.schedule("r0", U0, requirement=LayerComplete(2**64, 1))),
    ("IterationComplete -1", lambda s: s.transfer.schedule("r0", U0, requirement=IterationComplete(-1))),
    ("IterationComplete str", lambda s: s.transfer.schedule("r0", U0, requirement=IterationComplete("1"))),
    ("IterationComplete 2**64", lambda s: s.transfer.schedule("r0", U0, requirement=IterationComplete(2**64))),
    ("LayerNameComplete unknown", lambda s: s.transfer.schedule("r0", U0, requirement=LayerNameComplete("zz", 1))),
    ("LayerNameComplete name int", lambda s: s.transfer.schedule("r0", U0, requirement=LayerNameComplete(5, 1))),
    ("LayerNameComplete iteration -1", lambda s: s.transfer.schedule("r0", U0, requirement=LayerNameComplete("a", -1))),
    ("mark_layer_complete -1", lambda s: s.worker.mark_layer_complete(-1)),
    ("mark_layer_complete float", lambda s: s.worker.mark_layer_complete(1.5)),
    ("mark_layer_complete bool", lambda s: s.worker.mark_layer_complete(True)),
    ("mark_layer_complete None", lambda s: s.worker.mark_layer_complete(None)),
    ("mark_layer_complete unknown name", lambda s: s.worker.mark_layer_complete("zz")),
    ("mark_layer_complete 2**64", lambda s: s.worker.mark_layer_complete(2**64)),
    ("is_complete rid int", lambda s: s.worker.is_complete(1)),
    ("slot_status rid None", lambda s: s.worker.slot_status(None)),
    ("cancel_slot rid int", lambda s: s.worker.cancel_slot(3)),
    ("remove_slot rid bytes", lambda s: s.worker.remove_slot(b"r0")),
    ("poll max_items str", lambda s: s.transfer.poll(max_items="3")),
    ("poll max_items 0", lambda s: s.transfer.poll(max_items=0)),
    ("poll max_items -1", lambda s: s.transfer.poll(max_items=-1)),
    ("poll timeout -1", lambda s: s.transfer.poll(timeout=-1)),
    ("poll timeout nan", lambda s: s.transfer.poll(timeout=float("nan"))),
    ("LayerComplete layer 2**24-2", lambda s: s.transfer.schedule("r0", U0, requirement=LayerComplete(2**24 - 2, 1))),
    ("IterationComplete 2**40", lambda s: s.transfer.schedule("r0", U0, requirement=IterationComplete(2**40))),
    ("poll timeout str", lambda s: s.transfer.poll(timeout="1")),
]


class DifferentialMachine(RuleBasedStateMachine):
    """State: two schedulers built alike; ``handles``: key -> [core handle, reference handle]
    with the (rid, uuid, mode, requirement) they were scheduled with. Handles are kept here, never
    in a Bundle: Hypothesis would keep a reference and a drop could never happen.

    uuids: ``pool`` holds the POOL uuids in play. When a slot is removed, the uuids its worker
    enqueued leave the pool for ``removed`` (fresh ones take their places); they come back as
    worker halves (DuplicateOperationError while remembered), late transfer halves (S6: CANCEL at
    once while remembered, either mode) and requirement-free late halves (``late_half``)."""

    def __init__(self):
        super().__init__()
        FIGURES["examples"] += 1
        self.scheds = []
        self.handles = {}     # key -> [core, ref]
        self.meta = {}        # key -> (rid, uuid, mode, requirement)
        self.next_key = 0
        self.closed = False
        self.progress = (0, 0, False)   # (iteration, layers marked, iteration complete)
        self.seen_execute = set()       # keys whose EXECUTE was already gate-checked
        self.delivered = set()          # keys whose decision the test has seen (delivered)
        self.err_seq = 0
        self.pool = list(UUIDS)
        self.gen = 0
        self.removed = []               # uuids of removed slots, oldest first
        self.removed_rid = {}           # ... and the rid of that slot
        self.slot_uuids = {}            # rid -> uuids its worker enqueued into the live slot

    # ------------------------------------------------------------------ setup / teardown
    @initialize(max_inflight=st.integers(1, 3), named=st.booleans(),
                removed_memory=st.sampled_from([1, 2, 65536]))
    def build(self, max_inflight, named, removed_memory):
        kw = dict(max_inflight=max_inflight, layer_names=NAMES if named else None,
                  removed_memory=removed_memory, store_starvation_s=1e6)
        self.max_inflight, self.named, self.removed_memory = max_inflight, named, removed_memory
        self.scheds = [kvsched.Scheduler(**kw), ReferenceScheduler(**kw)]
        note(f"config: {kw}")

    def teardown(self):
        for s in self.scheds:
            s.close()
            s.close()  # idempotent (S10)
        self.handles.clear()

    # ------------------------------------------------------------------ comparison machinery
    def observe(self, i):
        """Everything observable on side i without delivering a decision."""
        s = self.scheds[i]
        out = {}
        for rid in RIDS:
            try:
                stt = s.worker.slot_status(rid)
                done = s.worker.is_complete(rid)
                errors = tuple((u, classify(m)) for u, m in stt.errors)
                out[rid] = (stt.expected, stt.completed, stt.failed, stt.cancelled, errors, done)
                # S4 on each side by itself
                assert done == (stt.completed + stt.failed + stt.cancelled == stt.expected), \
                    (i, rid, stt, done)
            except KvschedError as e:
                out[rid] = type(e).__name__
        out["handles"] = {k: peek(hs[i]) for k, hs in self.handles.items()}
        stats = s.stats()
        out["stats"] = {k: stats[k] for k in COUNTERS}
        return out

    def both(self, what, fn, rid=None, u=None):
        """Run fn(sched) on both sides. Returns [(ok, value_or_exception_class), ...]; asserts
        the same outcome class, the message content and S8 (a raising call changes nothing)."""
        FIGURES["calls_compared"] += 1
        res = []
        for i, s in enumerate(self.scheds):
            before = self.observe(i)
            try:
                res.append((True, fn(s)))
            except Exception as e:  # noqa: BLE001 - the class is what is compared
                cls, msg = type(e), str(e)
                del e
                res.append((False, cls))
                after = self.observe(i)
                assert after == before, (f"{what}: side {i} raised {cls.__name__} ({msg}) "
                                         f"but changed state:\n{before}\n->\n{after}")
                if issubclass(cls, KvschedError):
                    if rid is not None:
                        assert rid in msg, f"{what}: rid {rid!r} missing from {msg!r}"
                    if u is not None:
                        assert str(u) in msg, f"{what}: uuid {u} missing from {msg!r}"
        (ok0, v0), (ok1, v1) = res
        FIGURES["ok_calls"] += ok0 and ok1
        assert ok0 == ok1, f"{what}: core {'returned' if ok0 else 'raised'} {v0!r}, " \
                           f"reference {'returned' if ok1 else 'raised'} {v1!r}"
        if not ok0:
            assert v0 is v1, f"{what}: core raised {v0.__name__}, reference {v1.__name__}"
            FIGURES["errors_compared"] += 1
            FIGURES["error_types"][v0.__name__] += 1
        note(f"{what} -> {'ok' if ok0 else v0.__name__}")
        return res

    def pick(self, hi):
        keys = sorted(self.handles)
        return keys[hi % len(keys)]

    def add_handle(self, pair, rid, u, mode, req):
        k = self.next_key
        self.next_key += 1
        self.handles[k] = list(pair)
        self.meta[k] = (rid, u, mode, req)
        return k

    def satisfied(self, req):
        it, layers, done = self.progress
        if req is None:
            return True
        if isinstance(req, IterationComplete):
            return req.iteration < it or (req.iteration == it and done)
        layer = NAMES.index(req.name) if isinstance(req, LayerNameComplete) else req.layer
        return req.iteration < it or (req.iteration == it and (done or layer < layers))

    @invariant()
    def agree(self):
        if not self.scheds:
            return
        FIGURES["steps"] += 1
        o0, o1 = self.observe(0), self.observe(1)
        for o in (o0, o1):
            o["stats"] = {k: o["stats"][k] for k in CROSS}
        assert o0 == o1, f"core and reference disagree:\ncore {o0}\nref  {o1}"
        FIGURES["decisions_compared"] += len(o0["handles"])
        # S2: an EXECUTE decision is never seen before its requirement holds
        running = 0
        for k, (d, outcome) in o0["handles"].items():
            rid, u, mode, req = self.meta[k]
            if d == "EXECUTE" and mode is SCHEDULED:
                if k not in self.seen_execute:
                    self.seen_execute.add(k)
                    assert self.satisfied(req), f"{u} of {rid} executed before {req}: {self.progress}"
                if outcome == "open":
                    running += 1
            if self.closed:
                assert d != "None", f"undecided handle {u} after close"
        # S3: tokens
        assert running <= self.max_inflight
        st_ = o0["stats"]
        assert st_["inflight"] <= self.max_inflight and st_["peak_inflight"] <= self.max_inflight

    # ------------------------------------------------------------------ worker side
    @rule(rid=st.sampled_from(RIDS))
    def create_slot(self, rid):
        FIGURES["rules"]["create_slot"] += 1
        (ok, _), _ = self.both(f"create_slot({rid!r})", lambda s: s.worker.create_slot(rid),
                               rid=rid)
        if ok:
            self.slot_uuids[rid] = set()

    @rule(**ENQUEUE_ARGS)
    def enqueue(self, rid, ui, kind, mode, form, raw_ints, late=1):
        FIGURES["rules"]["enqueue"] += 1
        u = self.pool[ui]
        if late == 0 and self.removed:
            # A worker half re-using a removed slot's uuid: DuplicateOperationError while the uuid
            # is remembered, a new operation once forgotten (docs/semantics.md).
            u = self.removed[-1 - ui % len(self.removed)]
            FIGURES["rules"]["enqueue removed uuid"] += 1
        arg = UUID_FORMS[form][1](u)
        k, m = (int(kind), int(mode)) if raw_ints else (kind, mode)  # plain ints are accepted too
        (ok, _), _ = self.both(
            f"enqueue({rid!r}, {u}, {kind.name}, {mode.name}, {UUID_FORMS[form][0]})",
            lambda s: s.worker.enqueue(rid, arg, k, mode=m), rid=rid, u=u)
        if ok:
            self.slot_uuids[rid].add(u)

    @rule()
    def start_next_iteration(self):
        FIGURES["rules"]["start_next_iteration"] += 1
        (ok, v0), (_, v1) = self.both("start_next_iteration",
                                      lambda s: s.worker.start_next_iteration())
        if ok:
            assert v0 == v1 == self.progress[0] + 1
            self.progress = (v0, 0, False)

    @rule(layer=st.one_of(st.integers(0, 3), st.sampled_from(NAMES)))
    def mark_layer_complete(self, layer):
        """Right, repeated, skipped, out-of-range and outside-an-iteration marks (S7)."""
        FIGURES["rules"]["mark_layer_complete"] += 1
        (ok, _), _ = self.both(f"mark_layer_complete({layer!r})",
                               lambda s: s.worker.mark_layer_complete(layer))
        if ok:
            it, layers, done = self.progress
            idx = NAMES.index(layer) if isinstance(layer, str) else layer
            assert idx == layers and not done and it > 0
            self.progress = (it, layers + 1, done)

    @rule()
    def mark_iteration_complete(self):
        FIGURES["rules"]["mark_iteration_complete"] += 1
        (ok, _), _ = self.both("mark_iteration_complete",
                               lambda s: s.worker.mark_iteration_complete())
        if ok:
            it, layers, done = self.progress
            assert it > 0 and not done
            self.progress = (it, layers, True)

    @rule(rid=st.sampled_from(RIDS))
    def cancel_slot(self, rid):
        FIGURES["rules"]["cancel_slot"] += 1
        self.both(f"cancel_slot({rid!r})", lambda s: s.worker.cancel_slot(rid), rid=rid)

    @rule(rid=st.sampled_from(RIDS))
    def remove_slot(self, rid):
        FIGURES["rules"]["remove_slot"] += 1
        (ok, _), _ = self.both(f"remove_slot({rid!r})", lambda s: s.worker.remove_slot(rid),
                               rid=rid)
        if ok:
            for u in sorted(self.slot_uuids.pop(rid)):
                if u in self.removed:
                    continue  # re-used after it was forgotten; already listed
                self.removed.append(u)
                self.removed_rid[u] = rid
                if u in self.pool:
                    self.gen += 1
                    self.pool[self.pool.index(u)] = fresh_uuid(self.pool.index(u), self.gen)

    @rule()
    def take_finished(self):
        """Compared as sets of rids that are complete now. Legitimate difference: the core lists
        a rid once per completion (so twice if it completed twice since the last call, and even
        if it is incomplete again by the call), the reference once per call and only if still
        complete (docs/semantics.md: "reports a rid each time its last open operation ends")."""
        FIGURES["rules"]["take_finished"] += 1
        (ok, v0), (_, v1) = self.both("take_finished", lambda s: s.worker.take_finished())
        if ok:
            assert len(v1) == len(set(v1))
            for got in (v0, v1):
                assert set(got) <= set(RIDS)
            now_complete = {r for r in set(v0) if self.scheds[0].worker.is_complete(r)}
            assert set(v1) == now_complete, (v0, v1)

    # ------------------------------------------------------------------ transfer side
    @rule(**SCHEDULE_ARGS)
    def schedule(self, rid, ui, req, mode, form, late=1):
        FIGURES["rules"]["schedule"] += 1
        u = self.pool[ui]
        if late == 0 and self.removed:
            # A late half of a removed slot (S6), possibly again or IMMEDIATE.
            u = self.removed[-1 - ui % len(self.removed)]
            FIGURES["rules"]["schedule late half"] += 1
        self._schedule(rid, u, req, mode, form)

    def _schedule(self, rid, u, req, mode, form):
        arg = UUID_FORMS[form][1](u)
        res = self.both(f"schedule({rid!r}, {u}, {req}, {mode.name})",
                        lambda s: s.transfer.schedule(rid, arg, requirement=req, mode=mode),
                        rid=rid, u=u)
        (ok, h0), (_, h1) = res
        if ok:
            for h in (h0, h1):
                assert h.request_id == rid and h.uuid == u
            k = self.add_handle((h0, h1), rid, u, mode, req)
            if mode is IMMEDIATE:  # S5: decided EXECUTE, and delivered, at birth
                assert peek(h0)[0] == peek(h1)[0] == "EXECUTE"
                self.delivered.add(k)
        del res, h0, h1

    @precondition(lambda self: self.handles)
    @rule(**MARK_ARGS)
    def mark_complete(self, hi, how):
        """First marks, second marks and marks of CANCEL/undecided handles (ProtocolError)."""
        FIGURES["rules"]["mark_complete " + how] += 1
        k = self.pick(hi)
        hs = self.handles[k]
        d, outcome = peek(hs[0])
        if d == "EXECUTE":
            self.delivered.add(k)  # marking counts as delivery (docs/semantics.md)
        self.err_seq += 1
        text = f"E#{self.err_seq}"
        rid, u = self.meta[k][:2]

        def call(s):
            h = hs[self.scheds.index(s)]
            if how == "ok":
                return h.mark_complete()
            if how == "error str":
                return h.mark_complete(error=text)
            if how == "error exc":
                return h.mark_complete(error=Boom(text))
            if how == "with ok":
                with h:
                    return None
            try:
                with h:
                    raise Boom(text)
            except Boom:
                return "Boom propagated"

        self.both(f"mark_complete[{how}] of {u} ({d}, {outcome})", call, rid=rid, u=u)

    @precondition(lambda self: self.handles)
    @rule(hi=st.integers(0, 255), how=st.sampled_from(["decision", "wait0", "wait", "await"]))
    def deliver(self, hi, how):
        """Reading the decision delivers it (docs/semantics.md); results must agree."""
        FIGURES["rules"]["deliver " + how] += 1
        k = self.pick(hi)
        hs = self.handles[k]
        if how in ("wait", "await") and peek(hs[0])[0] == "None":
            how = "wait0"  # would block: single-threaded here (blocking is tests/concurrency's)

        def call(s):
            h = hs[self.scheds.index(s)]
            if how == "decision":
                return h.decision
            if how == "wait0":
                return h.wait(0)
            if how == "wait":
                return h.wait()
            return asyncio.run(_await(h))

        (ok, v0), (_, v1) = self.both(f"deliver[{how}] {self.meta[k][1]}", call)
        if ok:
            assert v0 == v1 and (v0 is None or isinstance(v0, Decision)), (v0, v1)
            if v0 is not None:
                self.delivered.add(k)

    @precondition(lambda self: self.handles)
    @rule(hi=st.integers(0, 255))
    def drop_handle(self, hi):
        """The caller lets go of a handle (S4): undelivered -> nothing changes; delivered EXECUTE
        and unmarked -> failed with HandleDroppedError (compared at the next observation)."""
        FIGURES["rules"]["drop_handle"] += 1
        k = self.pick(hi)
        note(f"drop handle of {self.meta[k][1]} ({peek(self.handles[k][0])})")
        pair = self.handles.pop(k)
        del pair
        # Handles hold no reference cycles, so refcounting frees them at once; a young-generation
        # collection is enough and costs microseconds where a full one costs ~60 ms here.
        gc.collect(0)

    @rule(max_items=st.integers(1, 3))
    def poll(self, max_items):
        """Decided undelivered handles, each once; the same objects while held. A batch of
        ``max_items`` and then the rest: the batches must have the same size on both sides and
        together the same handles. (Which of several handles decided by one call comes first is
        not specified: cancel_slot decides waiting transfer halves and slot operations in
        different orders in the two implementations.)"""
        FIGURES["rules"]["poll"] += 1
        got = {0: [], 1: []}
        for n in (max_items, 64):
            (ok, g0), (_, g1) = self.both(f"poll({n})",
                                          lambda s: s.transfer.poll(max_items=n, timeout=0))
            if not ok:
                return
            assert len(g0) == len(g1) <= n, ([h.uuid for h in g0], [h.uuid for h in g1])
            got[0] += g0
            got[1] += g1
            del g0, g1
        # Label every returned handle: the key of the held pair it is (by identity), or
        # ("new", uuid, n) for a handle object this test does not hold (its first object was
        # dropped undelivered). One uuid can have two handles: a transfer half that joined, and a
        # late one after its slot was removed (both CANCEL).
        labels = [[], []]
        for i in (0, 1):
            seen = collections.Counter()
            for h in got[i]:
                k = next((k for k, hs in self.handles.items() if hs[i] is h), None)
                if k is None:
                    seen[h.uuid] += 1
                    k = ("new", h.uuid, seen[h.uuid])
                assert k not in labels[i], f"poll returned {h!r} twice"
                labels[i].append(k)
        assert sorted(labels[0], key=str) == sorted(labels[1], key=str), labels
        for i0, k in enumerate(labels[0]):
            if isinstance(k, tuple):
                pair = (got[0][i0], got[1][labels[1].index(k)])
                k = self.add_handle(pair, pair[0].request_id, k[1], SCHEDULED, None)
                self.seen_execute.add(k)  # its requirement was gate-checked or is unknown
                del pair
            self.delivered.add(k)
        got.clear()

    # ------------------------------------------------------------------ macros
    # Idioms of several calls in one step (each call compared as usual), so short programs reach
    # deep states: joined operations, retired and re-created slots, reused uuids.
    @rule(worker_first=st.booleans(),
          **{k: v for k, v in SCHEDULE_ARGS.items() if k not in ("form", "late")},
          kind=st.sampled_from([LOAD, STORE]))
    def join(self, worker_first, rid, ui, req, mode, kind):
        """Both halves of one operation, in either order (S1)."""
        FIGURES["rules"]["join"] += 1
        halves = [lambda: self.enqueue(rid=rid, ui=ui, kind=kind, mode=mode, form=0,
                                       raw_ints=False),
                  lambda: self.schedule(rid=rid, ui=ui, req=req, mode=mode, form=2)]
        for half in halves if worker_first else halves[::-1]:
            half()

    @rule(rid=st.sampled_from(RIDS), recreate=st.booleans(), cancel=st.booleans())
    def retire(self, rid, recreate, cancel):
        """End a request the way an engine does: mark its running copies, cancel the rest (or
        not), remove the slot (SlotBusyError if something is still open), maybe re-create it."""
        FIGURES["rules"]["retire"] += 1
        for k in sorted(self.handles):
            if self.meta[k][0] == rid and peek(self.handles[k][0]) == ("EXECUTE", "open"):
                self.mark_complete(hi=sorted(self.handles).index(k), how="ok")
        if cancel:
            self.cancel_slot(rid)
        self.remove_slot(rid)
        if recreate:
            self.create_slot(rid)

    # Hypothesis picks among the enabled rules uniformly: second names for the rules that build
    # state make them twice as likely as the observers and the misuse.
    @rule(**ENQUEUE_ARGS)
    def enqueue_again(self, **kw):
        self.enqueue(**kw)

    @rule(**SCHEDULE_ARGS)
    def schedule_again(self, **kw):
        self.schedule(**kw)

    @precondition(lambda self: self.handles)
    @rule(**MARK_ARGS)
    def mark_complete_again(self, **kw):
        self.mark_complete(**kw)

    @rule(rid=st.sampled_from(RIDS))
    def create_slot_again(self, rid):
        self.create_slot(rid)

    @precondition(lambda self: self.removed)
    @rule(rid=st.sampled_from(RIDS), ri=st.integers(0, 255), req=requirements(),
          own_rid=st.booleans())
    def late_half(self, rid, ri, req, own_rid):
        """A transfer half for a uuid of a removed slot (S6: CANCEL at once while remembered;
        a new operation once forgotten)."""
        u = self.removed[-1 - ri % len(self.removed)]
        if own_rid:
            rid = self.removed_rid[u]
        FIGURES["rules"]["schedule late half"] += 1
        self._schedule(rid, u, req, SCHEDULED, form=ri % len(UUID_FORMS))

    # ------------------------------------------------------------------ close and misuse
    @precondition(lambda self: not self.closed)
    @rule(now=st.integers(0, 15))
    def close(self, now):
        """S10 (drawn rarely: a closed pair only raises SchedulerClosedError afterwards)."""
        if now:
            return
        FIGURES["rules"]["close"] += 1
        self.both("close", lambda s: s.close())
        self.closed = True
        self.both("close again", lambda s: s.close())

    @rule(which=st.integers(0, len(BAD_CALLS) - 1))
    def bad_call(self, which):
        what, fn = BAD_CALLS[which]
        FIGURES["bad_inputs"][what] += 1
        (ok, v0), _ = self.both(what, fn)
        assert not ok, f"{what} was accepted"
        assert issubclass(v0, (TypeError, ValueError, KvschedError)), v0

    @precondition(lambda self: self.handles)
    @rule(hi=st.integers(0, 255), which=st.sampled_from(["error int", "error list"]))
    def bad_mark(self, hi, which):
        FIGURES["bad_inputs"]["mark_complete " + which] += 1
        hs = self.handles[self.pick(hi)]
        bad = 5 if which == "error int" else ["x"]
        (ok, v0), _ = self.both(f"mark_complete(error={bad!r})",
                                lambda s: hs[self.scheds.index(s)].mark_complete(error=bad))
        assert not ok and v0 is TypeError


async def _await(h):
    return await h


DifferentialMachine.TestCase.settings = settings(settings.get_profile(
    "long" if STRESS == "long" else "ci"))
TestDifferential = DifferentialMachine.TestCase


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    figs = dict(FIGURES)
    figs["profile"] = "long" if STRESS == "long" else "ci"
    figs["max_examples"] = DifferentialMachine.TestCase.settings.max_examples
    figs["stateful_step_count"] = DifferentialMachine.TestCase.settings.stateful_step_count
    figs["bad_input_kinds"] = len(figs["bad_inputs"])
    write_report("model_state_machine", figs)
