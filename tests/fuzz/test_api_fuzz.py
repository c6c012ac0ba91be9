"""Fuzzing of the whole public API with random and hostile arguments (issue 10, "Keep looking").

Every call this file makes goes through ``attempt``, which asserts:

* no crash and no hang: the call runs on a helper thread and must return within ``CALL_LIMIT``.
  A call given a long or endless timeout (``wait(None)``, ``poll(timeout=inf)``...) may block;
  after ``BLOCK_PROBE`` seconds the test closes the scheduler, and the call must then return
  within ``WAKE_LIMIT`` (S10). An accepted long timeout must not return at once (an overflowing
  conversion would);
* the outcome is a success or one of ``ALLOWED`` (``TypeError``, ``ValueError``,
  ``OverflowError``, a ``KvschedError``, or the caller's own ``Hostile`` raised by a hostile
  argument's dunder method): never ``RuntimeError``, ``SystemError``, ``AttributeError``...;
* an error message is bounded (``MAX_MESSAGE``): a multi-MB argument is never copied whole;
* a refused call leaves everything as it was: the integer ``stats()`` counters, ``slot_status``
  and ``is_complete`` of every known slot, every known handle's decision and outcome (read from
  ``repr``, which delivers nothing), the transfer engine's counters and the destination bytes;
* per argument role, the kinds of value that must be refused (e.g. a member of another enum as a
  ``kind``, a float where an int goes, an unknown uuid form) and those that must be accepted
  (anything with ``__index__`` where an int goes, every ``uuid.UUID`` form): see ``ROLES``.

Tests:

* ``test_sweep``: deterministic, every (entry point, argument, kind of bad input) combination
  once, on a scheduler with real state; all failures are collected and reported together.
* ``test_contextual``: hostile situations rather than values (closed scheduler and engine, a
  handle of another scheduler, the same handle twice, an ended handle, an array made read-only
  after its pool was built...); ``test_await_hostile``: one handle awaited from two event loops,
  and a decision that comes after the awaiting loop gave up and closed.
* ``TestFuzzMachine``: Hypothesis ``RuleBasedStateMachine``: random sequences of valid calls and
  hostile calls (one or several arguments replaced) on one scheduler, its engine and handles.
* ``test_constructors``: ``Scheduler``, ``TransferEngine`` and ``BlockPool.from_array`` with
  hostile arguments; ``test_durations_honoured_or_refused``: an accepted duration is honoured.
* ``test_fork_*``: a forked child using inherited schedulers and engines; each runs in a child
  that reports every step on a pipe and exits with ``os._exit``; the parent waits with a
  deadline and kills a child that does not finish.

``BAD_INPUT_KINDS`` lists every kind of bad input covered (``docs/reliability.md`` cites its
size); ``test_bad_input_kinds`` checks the list against what the tests use.

Sizes: ``KVSCHED_STRESS=ci`` (default) runs the machine and ``test_constructors`` on 75
programs each, derandomized, and reports the first failing program unshrunk (the sweep names the
single calls); the whole file takes about 25 s on 2 cores when nothing fails (a failing call
that hangs costs ``CALL_LIMIT`` more). ``KVSCHED_STRESS=long`` runs 3,000 programs of up to 80
steps with random seeds, shrinks every distinct failure, and samples 5,000 multi-argument calls
in the sweep. ``KVSCHED_FUZZ_EXAMPLES=N`` overrides the number of programs.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import gc
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvsched
from kvsched import (BlockPool, Decision, IterationComplete, LayerComplete, LayerNameComplete,
                     RequestMode, Scheduler, TransferEngine, TransferKind)
from kvsched.errors import KvschedError
from figures import STRESS, write_report

LONG = STRESS == "long"
FUZZ_EXAMPLES = int(os.environ.get("KVSCHED_FUZZ_EXAMPLES", "3000" if LONG else "75"))

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                      HealthCheck.data_too_large],
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
# ci: the first failing program is reported as found, unshrunk (shrinking takes up to minutes;
# the sweep gives the minimal calls); long: every distinct failure, shrunk.
settings.register_profile("fuzz-ci", derandomize=True, database=None, report_multiple_bugs=False,
                          max_examples=FUZZ_EXAMPLES, stateful_step_count=25,
                          **{**_COMMON, "phases": [Phase.explicit, Phase.reuse, Phase.generate]})
settings.register_profile("fuzz-long", max_examples=FUZZ_EXAMPLES, stateful_step_count=80,
                          **_COMMON)
PROFILE = settings.get_profile("fuzz-long" if LONG else "fuzz-ci")

pytestmark = pytest.mark.timeout(120 if not LONG else 4 * 3600)

LOAD, STORE = TransferKind.LOAD, TransferKind.STORE
SCHEDULED, IMMEDIATE = RequestMode.SCHEDULED, RequestMode.IMMEDIATE
EXECUTE, CANCEL = Decision.EXECUTE, Decision.CANCEL

NAMES = ["a", "b", "c"]          # layer names of the fuzzed scheduler (3 layers)
BLOCKS, BLOCK_BYTES = 8, 16      # geometry of the host pools

CALL_LIMIT = 2.0     # seconds any call may take (generous: CI machines are loaded)
BLOCK_PROBE = 0.2    # a call with a long timeout may block this long before close() is called
WAKE_LIMIT = 2.0     # after close(), a blocked call returns within this
EARLY = 0.1         # an accepted timeout >= BLOCK_PROBE that returns sooner returned "at once"
MAX_MESSAGE = 64 * 1024   # longest error message or recorded slot error, in characters
HUGE = 4 * 1024 * 1024    # length of the huge strings

ALLOWED = (TypeError, ValueError, OverflowError, KvschedError)
CAN_FORK = sys.platform.startswith("linux") and hasattr(os, "fork")


class Hostile(Exception):
    """Raised by the dunder methods of hostile arguments. It is the caller's own exception, so it
    may propagate (or be turned into a TypeError); either way the call must change nothing."""


# ------------------------------------------------------------------------- hostile values

class RaisingIndex:
    def __index__(self):
        raise Hostile("__index__")

    def __int__(self):
        raise Hostile("__int__")

    def __float__(self):
        raise Hostile("__float__")

    def __repr__(self):
        return "<RaisingIndex>"


class RaisingStr:
    def __str__(self):
        raise Hostile("__str__")

    __repr__ = __str__


class RaisingEq:
    def __eq__(self, other):
        raise Hostile("__eq__")

    def __hash__(self):
        raise Hostile("__hash__")

    def __repr__(self):
        return "<RaisingEq>"


class RaisingException(Exception):
    """An exception (a valid ``error=``) whose str() and repr() raise."""

    def __str__(self):
        raise Hostile("__str__")

    __repr__ = __str__


class RaisingIter:
    """Yields one valid element, then raises; claims two elements."""

    def __init__(self, first):
        self.first = first

    def __iter__(self):
        yield self.first
        raise Hostile("__iter__")

    def __len__(self):
        return 2

    def __repr__(self):
        return "<RaisingIter>"


class IndexObject:
    """Not an int, but has ``__index__`` (as numpy integers do)."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value

    def __repr__(self):
        return f"IndexObject({self.value})"


class IntSub(int):
    pass


class StrSub(str):
    pass


class UuidSub(uuid.UUID):
    pass


class ForeignEnum(enum.IntEnum):
    ZERO = 0
    ONE = 1


def _int(valid, default=1):
    if isinstance(valid, (int, np.integer)) and not isinstance(valid, (bool, np.bool_)):
        return int(valid)
    return default


def _num(valid, default=1.0):
    if isinstance(valid, (int, float)) and not isinstance(valid, bool):
        return valid
    return default


def _uuid(valid):
    return valid if isinstance(valid, uuid.UUID) else uuid.uuid4()


def _seq(valid):
    return list(valid) if isinstance(valid, (list, tuple)) else [valid]


# kind -> (one-line description, factory(valid value of the argument) -> hostile value)
KINDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "none": ("None", lambda v: None),
    "bool_true": ("True (a bool where an int, str or float goes)", lambda v: True),
    "bool_false": ("False", lambda v: False),
    "int_negative": ("-1", lambda v: -1),
    "int_out_of_range": ("7: a small int outside an enum or the layer range", lambda v: 7),
    "int_2_63": ("2**63 (one past int64)", lambda v: 2**63),
    "int_2_64": ("2**64 (one past uint64)", lambda v: 2**64),
    "int_bignum": ("10**400 (no float can hold it)", lambda v: 10**400),
    "int_neg_huge": ("-2**63 - 1", lambda v: -(2**63) - 1),
    "uuid_int": ("a uuid as its 128-bit int", lambda v: _uuid(v).int),
    "float_nan": ("NaN", lambda v: float("nan")),
    "float_inf": ("+inf", lambda v: float("inf")),
    "float_neg_inf": ("-inf", lambda v: float("-inf")),
    "float_neg_zero": ("-0.0", lambda v: -0.0),
    "float_integral": ("a float with an integral value where an int goes (1.0)",
                       lambda v: float(_num(v))),
    "float_fraction": ("0.5", lambda v: 0.5),
    "float_huge": ("1e30", lambda v: 1e30),
    "float_subnormal": ("5e-324, the smallest positive float", lambda v: 5e-324),
    "enum_decision": ("Decision.EXECUTE (another enum)", lambda v: Decision.EXECUTE),
    "enum_transfer_kind": ("TransferKind.STORE (e.g. as a mode)", lambda v: TransferKind.STORE),
    "enum_request_mode": ("RequestMode.IMMEDIATE (e.g. as a kind)", lambda v: RequestMode.IMMEDIATE),
    "enum_foreign": ("a member of an IntEnum of another module", lambda v: ForeignEnum.ONE),
    "np_int64": ("numpy.int64 of the valid value", lambda v: np.int64(_int(v))),
    "np_uint8": ("numpy.uint8 of the valid value", lambda v: np.uint8(_int(v) % 256)),
    "np_float32": ("numpy.float32 of the valid value", lambda v: np.float32(_num(v))),
    "np_bool": ("numpy.bool_(True)", lambda v: np.bool_(True)),
    "np_array_0d": ("a 0-d numpy array", lambda v: np.array(_int(v))),
    "int_subclass": ("an int subclass of the valid value", lambda v: IntSub(_int(v))),
    "index_object": ("a non-int object with __index__ returning the valid value",
                     lambda v: IndexObject(_int(v))),
    "raising_index": ("an object whose __index__/__int__/__float__ raise", lambda v: RaisingIndex()),
    "raising_str": ("an object whose __str__/__repr__ raise", lambda v: RaisingStr()),
    "raising_eq_hash": ("an object whose __eq__/__hash__ raise", lambda v: RaisingEq()),
    "raising_exception": ("an exception whose __str__/__repr__ raise",
                          lambda v: RaisingException()),
    "plain_object": ("object()", lambda v: object()),
    "str_empty": ('""', lambda v: ""),
    "str_huge": ("a 4 MB string", lambda v: "r" * HUGE),
    "str_nul": ("a string with a NUL character", lambda v: "r\x00x"),
    "str_surrogate": ("a string with a lone surrogate (not encodable as UTF-8)",
                      lambda v: "r\ud800"),
    "str_subclass": ("a str subclass of the valid value",
                     lambda v: StrSub(v if isinstance(v, str) else
                                      str(v) if isinstance(v, uuid.UUID) else "r0")),
    "str_numeric": ('"1": a number as a string', lambda v: "1"),
    "str_for_list": ('"abc": a string where a list goes', lambda v: "abc"),
    "bytes_value": ('b"r0": bytes where a str goes', lambda v: b"r0"),
    "bytearray_value": ("a 16-byte bytearray", lambda v: bytearray(_uuid(v).bytes)),
    "uuid_bytes_15": ("15 bytes (a uuid is 16)", lambda v: b"\x01" * 15),
    "uuid_bytes_17": ("17 bytes", lambda v: b"\x01" * 17),
    "uuid_str_malformed": ("a uuid string with a bad digit",
                           lambda v: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fz"),
    "uuid_str_urn": ('a "urn:uuid:..." string (a form uuid.UUID accepts)',
                     lambda v: _uuid(v).urn),
    "uuid_subclass": ("an instance of a uuid.UUID subclass", lambda v: UuidSub(int=_uuid(v).int)),
    "list_empty": ("[]", lambda v: []),
    "list_of_none": ("[None]", lambda v: [None]),
    "tuple_value": ("(0, 1)", lambda v: (0, 1)),
    "dict_value": ('{"a": 1}', lambda v: {"a": 1}),
    "generator": ("a one-shot generator of the valid elements",
                  lambda v: (x for x in _seq(v))),
    "raising_iter": ("an iterable that raises after its first element",
                     lambda v: RaisingIter(_seq(v)[0])),
    "batch_duplicate": ("a batch whose last element repeats its first",
                        lambda v: _seq(v) + _seq(v)[:1]),
    "batch_bad_tail": ("a batch of valid elements and a malformed last one",
                       lambda v: _seq(v) + ["bad"]),
    "batch_huge": ("10,000 fresh uuids and a repeat of the first",
                   lambda v: (lambda us: us + us[:1])([uuid.uuid4() for _ in range(10_000)])),
    "nested_huge_int": ("[(2**63, 0)]: a huge int inside a list", lambda v: [(2**63, 0)]),
}

# Hostile situations rather than values (test_contextual, the machine and the fork tests).
CONTEXT_KINDS: dict[str, str] = {
    "closed_scheduler": "every call on a closed scheduler's sides and handles",
    "closed_engine": "submit to a closed TransferEngine",
    "foreign_handle": "a handle of another scheduler submitted to an engine",
    "same_handle_twice": "the same handle submitted twice, or marked twice",
    "ended_handle": "a handle whose operation already ended, submitted again",
    "undecided_handle": "an undecided handle submitted or marked",
    "cancelled_handle": "a CANCEL handle submitted",
    "readonly_after_pool": "an array made read-only after its pool was built, as a destination",
    "zero_size_blocks": "an array whose blocks have zero bytes",
    "non_contiguous_array": "an array whose block dimension is not C-contiguous",
    "object_dtype_array": "an array of Python objects",
    "float_pairs": "block pairs as a float array",
    "pairs_wrong_shape": "block pairs shaped (N, 3)",
    "pairs_out_of_range": "block ids past the pool's end, or negative",
    "pool_mismatch": "source and destination pools of different block sizes",
    "unknown_kwarg": "an unknown keyword argument",
    "extra_positional": "one positional argument too many",
    "forked_child": "an inherited scheduler or engine used in a forked child",
    "await_closed": "await of a handle whose scheduler is closed mid-wait",
    "await_two_loops": "the same handle awaited from two event loops (two threads) at once",
    "await_loop_gone": "a handle decided after the event loop that awaited it timed out and closed",
}

BAD_INPUT_KINDS: dict[str, str] = {**{k: d for k, (d, _) in KINDS.items()}, **CONTEXT_KINDS}

# ------------------------------------------------------------------------- argument roles

STRS = {"str_empty", "str_huge", "str_nul", "str_surrogate", "str_subclass", "str_numeric",
        "str_for_list", "uuid_str_malformed", "uuid_str_urn"}
BYTES = {"bytes_value", "bytearray_value", "uuid_bytes_15", "uuid_bytes_17"}
FLOATS = {"float_nan", "float_inf", "float_neg_inf", "float_neg_zero", "float_integral",
          "float_fraction", "float_huge", "float_subnormal", "np_float32"}
BOOLS = {"bool_true", "bool_false", "np_bool"}
BIGINTS = {"int_2_63", "int_2_64", "int_bignum", "int_neg_huge", "uuid_int"}
ENUMS = {"enum_decision", "enum_transfer_kind", "enum_request_mode", "enum_foreign"}
OBJECTS = {"plain_object", "raising_index", "raising_str", "raising_eq_hash", "raising_exception",
           "uuid_subclass"}
CONTAINERS = {"list_empty", "list_of_none", "tuple_value", "dict_value", "generator",
              "raising_iter", "batch_duplicate", "batch_bad_tail", "batch_huge", "nested_huge_int"}
INDEXES = {"np_int64", "np_uint8", "int_subclass", "index_object"}   # __index__ of a valid value
OTHER = {"none", "int_negative", "int_out_of_range", "np_array_0d"}
GROUPS = (STRS, BYTES, FLOATS, BOOLS, BIGINTS, ENUMS, OBJECTS, CONTAINERS, INDEXES, OTHER)
ALL = set(KINDS)

_INT_REFUSE = {"none", "int_negative"} | STRS | BYTES | FLOATS | BOOLS | BIGINTS | OBJECTS | CONTAINERS


@dataclass(frozen=True)
class Role:
    """What an argument accepts. ``refuse``: kinds that must raise; ``accept``: kinds that must not
    be refused for their type or value (TypeError/ValueError/OverflowError); the rest may go
    either way (only the generic checks apply)."""

    refuse: frozenset
    accept: frozenset = frozenset()


def _role(refuse, accept=()):
    refuse, accept = frozenset(refuse), frozenset(accept)
    assert not refuse & accept
    return Role(refuse, accept)


ROLES: dict[str, Role] = {
    # an int (layer index, iteration, max_items, sizes): anything with __index__ (issue 10.8)
    "int": _role(_INT_REFUSE, INDEXES),
    # a size or a bound where 2**63 may mean "unbounded"
    "size": _role(_INT_REFUSE - {"int_2_63"}, INDEXES),
    "int_opt": _role(_INT_REFUSE - {"none"}, INDEXES | {"none"}),
    "block_dim": _role(_INT_REFUSE - {"int_negative"}, INDEXES),
    # a kind or a mode: its own enum or its int value; another enum is a TypeError (issue 10.6)
    "kind": _role(_INT_REFUSE | {"int_out_of_range", "enum_decision", "enum_request_mode",
                                 "enum_foreign"}, INDEXES | {"enum_transfer_kind"}),
    "mode": _role(_INT_REFUSE | {"int_out_of_range", "enum_decision", "enum_transfer_kind",
                                 "enum_foreign"}, INDEXES | {"enum_request_mode"}),
    # seconds: None or >= 0 (wait, poll)
    "timeout": _role({"int_negative", "int_neg_huge", "float_nan", "float_neg_inf"} | STRS | BYTES
                     | OBJECTS | CONTAINERS,
                     INDEXES | {"float_integral", "float_neg_zero", "float_subnormal", "np_float32"}),
    # seconds >= 0 (store_starvation_s)
    "duration": _role({"none", "int_negative", "int_neg_huge", "float_nan", "float_neg_inf"} | STRS
                      | BYTES | OBJECTS | CONTAINERS,
                      INDEXES | {"float_integral", "float_neg_zero", "float_fraction", "np_float32"}),
    # None or seconds > 0 (op_timeout)
    "duration_opt": _role({"int_negative", "int_neg_huge", "float_nan", "float_neg_inf",
                           "float_neg_zero"} | STRS | BYTES | OBJECTS | CONTAINERS,
                          INDEXES | {"none", "float_integral", "float_fraction", "np_float32"}),
    "rid": _role(ALL - STRS, {"str_subclass", "str_numeric", "str_huge"}),
    "name": _role(ALL - {"str_subclass"}, {"str_subclass"}),          # a registered layer name
    # every form uuid.UUID takes (issue 10.10), its 16 bytes, a UUID (subclasses too)
    "uuid": _role(ALL - {"uuid_str_urn", "uuid_subclass", "bytearray_value", "str_subclass"},
                  {"uuid_str_urn", "uuid_subclass", "str_subclass"}),
    "uuids": _role(ALL - {"list_empty", "generator"}, {"generator"}),
    "requirement": _role(ALL - {"none"}, {"none"}),
    "error": _role(ALL - STRS - {"none", "raising_exception"},
                   (STRS - {"str_surrogate"}) | {"none"}),
    "handle": _role(ALL),
    "pool": _role(ALL),
    "array": _role(ALL),
    "pairs": _role(ALL - {"list_empty", "generator", "tuple_value", "batch_duplicate"}),
    "layers": _role(STRS | FLOATS | BIGINTS | OBJECTS | BOOLS
                    | {"int_negative", "list_of_none", "dict_value", "raising_iter",
                       "batch_bad_tail", "batch_huge", "bytes_value", "nested_huge_int"},
                    {"none", "tuple_value", "generator"}),
    "names": _role(STRS | BYTES | FLOATS | BIGINTS | BOOLS | ENUMS | OBJECTS | INDEXES
                   | {"int_negative", "int_out_of_range", "list_of_none", "tuple_value",
                      "raising_iter", "batch_huge", "batch_duplicate", "np_array_0d",
                      "nested_huge_int"},
                   {"none", "list_empty", "generator"}),
    "backend": _role(ALL - {"str_subclass"}),
    "scheduler": _role(()),
}

# ------------------------------------------------------------------------- the world under test


class World:
    """One scheduler with real state (slots with executing, gated, undecided and completed
    operations; iteration 1 started), a second scheduler (for foreign handles), a host transfer
    engine (made on first use) and two host pools. Every object a call returns is kept, so no
    handle is dropped (drop detection is asynchronous and would change stats between the two
    snapshots of a refused call)."""

    def __init__(self, max_inflight: int = 2):
        self.s = Scheduler(max_inflight=max_inflight, layer_names=NAMES)
        self.other = Scheduler()
        self._eng: TransferEngine | None = None
        self.src_arr = np.arange(len(NAMES) * BLOCKS * BLOCK_BYTES, dtype=np.uint8).reshape(
            len(NAMES), BLOCKS, BLOCK_BYTES)
        self.dst_arr = np.zeros_like(self.src_arr)
        self.src = BlockPool.from_array(self.src_arr)
        self.dst = BlockPool.from_array(self.dst_arr)
        self.keep: list[Any] = []
        self.handles: list[Any] = []
        self.rids = ["r", "done", "busy"]
        self.n = 0
        w, t = self.s.worker, self.s.transfer
        for rid in self.rids:
            w.create_slot(rid)
        w.start_next_iteration()
        u = uuid.uuid4()
        w.enqueue("done", u, LOAD)
        h = t.schedule("done", u)
        h.wait(1)
        h.mark_complete()
        self.handles.append(h)
        self.executing = self.join("busy", LOAD)                  # EXECUTE, open
        self.gated = self.join("busy", STORE, LayerComplete(2, 1))   # waits for layer 2
        self.undecided = t.schedule("busy", uuid.uuid4())         # its worker half never comes
        self.handles += [self.executing, self.gated, self.undecided]

    # helpers -----------------------------------------------------------------------------
    def fresh_rid(self, prefix="n") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def join(self, rid, kind=LOAD, requirement=None, mode=SCHEDULED):
        u = uuid.uuid4()
        self.s.worker.enqueue(rid, u, kind, mode)
        h = self.s.transfer.schedule(rid, u, requirement, mode)
        self.handles.append(h)
        return h

    def immediate(self, rid="r"):
        """A handle decided EXECUTE at once (IMMEDIATE: takes no token)."""
        return self.join(rid, LOAD, None, IMMEDIATE)

    def new_slot(self) -> str:
        rid = self.fresh_rid("slot")
        self.s.worker.create_slot(rid)
        self.rids.append(rid)
        return rid

    @property
    def eng(self) -> TransferEngine:
        if self._eng is None:
            self._eng = TransferEngine(self.s, backend="host", workers=1)
        return self._eng

    def drain_poll(self):
        while True:
            got = self.s.transfer.poll(1024, 0)
            self.keep.extend(got)
            if not got:
                return

    def next_layer(self) -> int:
        st_ = self.s.stats()
        if st_["layers_complete"] >= len(NAMES):
            self.s.worker.start_next_iteration()
            return 0
        return st_["layers_complete"]

    # observation -------------------------------------------------------------------------
    def status(self, rid):
        try:
            st_ = self.s.worker.slot_status(rid)
            return (st_.expected, st_.completed, st_.failed, st_.cancelled,
                    tuple((str(u), m) for u, m in st_.errors), self.s.worker.is_complete(rid))
        except KvschedError as e:
            return type(e).__name__

    def snapshot(self) -> dict:
        if self._eng is not None:
            self._eng.wait_idle(CALL_LIMIT)
        snap = {k: v for k, v in self.s.stats().items() if not k.endswith("_us")}
        snap["closed"] = self.s.closed
        snap["slots"] = {rid: self.status(rid) for rid in self.rids}
        snap["handles"] = [peek(h) for h in self.handles]
        snap["dst"] = zlib.crc32(self.dst_arr.tobytes())
        if self._eng is not None:
            es = self._eng.stats()
            snap["engine"] = {k: es[k] for k in ("submitted", "completed", "failed", "rejected",
                                                 "bytes", "copies", "pending")}
        return snap

    def check_invariants(self):
        for rid in self.rids:
            try:
                st_ = self.s.worker.slot_status(rid)
            except KvschedError:
                continue
            for u, msg in st_.errors:
                assert len(msg) <= MAX_MESSAGE, (
                    f"slot {rid[:40]!r} keeps an error message of {len(msg)} characters")
            try:
                done = self.s.worker.is_complete(rid)
            except KvschedError:
                continue
            if not self.s.closed:
                assert done == (st_.completed + st_.failed + st_.cancelled == st_.expected), rid

    def close(self):
        """Mark what is still executing (so nothing is reported dropped), then close all."""
        kept = [y for x in self.keep for y in (x if isinstance(x, list) else [x])]
        for h in self.handles + [x for x in kept if isinstance(x, kvsched.Handle)]:
            try:
                if "decision=EXECUTE outcome=open" in peek(h):
                    h.mark_complete()
            except (KvschedError, TypeError, ValueError):
                pass
        if self._eng is not None:
            self._eng.close(timeout=CALL_LIMIT)
        self.s.close()
        self.other.close()


def peek(h) -> str:
    """A handle's decision and outcome without delivering it (repr delivers nothing)."""
    r = repr(h)
    return r[r.rfind(" decision="):]


def nominal_seconds(value) -> float:
    """How long a timeout argument asks to wait, as far as Python can tell (inf for None)."""
    if value is None:
        return math.inf
    try:
        x = float(value)
    except Exception:
        return 0.0
    return x if x == x else 0.0


# ------------------------------------------------------------------------- one checked call

FIGURES: dict = {"calls": 0, "refused": 0, "accepted": 0, "woken_by_close": 0,
                 "kinds": collections.Counter(), "entries": collections.Counter()}


class Finding(AssertionError):
    pass


def run_bounded(fn: Callable[[], Any], limit: float):
    """(finished, value, exception, seconds): fn() on a helper thread, waited for ``limit``."""
    box: dict = {}

    def target():
        t0 = time.perf_counter()
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - classified by the caller
            box["exc"] = e
        box["dt"] = time.perf_counter() - t0

    th = threading.Thread(target=target, daemon=True, name="kvsched-fuzz-call")
    th.start()
    th.join(limit)
    return (not th.is_alive(), box.get("value"), box.get("exc"), box.get("dt"), th)


def attempt(world: World | None, label: str, fn: Callable[[], Any], expect: str = "either",
            may_block: float = 0.0, undecided_probe: bool = False):
    """Run one call and check it (module docstring). ``expect``: "refuse", "accept" or "either".
    ``may_block``: the nominal timeout of the call (0 for a call that must not block).
    ``undecided_probe``: the call waits on something that is not decided, so an accepted timeout
    >= BLOCK_PROBE must not return sooner. Returns ("ok", value) or ("raised", exception)."""
    FIGURES["calls"] += 1
    before = world.snapshot() if world is not None else None
    limit = BLOCK_PROBE if may_block >= BLOCK_PROBE else CALL_LIMIT
    done, value, exc, dt, th = run_bounded(fn, limit)
    if not done:
        if may_block < BLOCK_PROBE or world is None:
            raise Finding(f"{label}: no return within {limit} s (hang)")
        world.s.close()
        world.other.close()
        th.join(WAKE_LIMIT)
        if th.is_alive():
            raise Finding(f"{label}: blocked, and still blocked {WAKE_LIMIT} s after close()")
        FIGURES["woken_by_close"] += 1
        if expect == "refuse":
            raise Finding(f"{label}: accepted (blocked until close()), must be refused")
        return ("ok", None)
    if exc is None:
        FIGURES["accepted"] += 1
        if world is not None:
            world.keep.append(value)
        if expect == "refuse":
            raise Finding(f"{label}: accepted (returned {short(value)}), must be refused")
        if undecided_probe and may_block >= BLOCK_PROBE and not value and dt < EARLY:
            raise Finding(f"{label}: a timeout of {may_block} s returned {value!r} after "
                          f"{dt * 1e3:.1f} ms (an overflowing conversion?)")
        return ("ok", value)
    FIGURES["refused"] += 1
    if not isinstance(exc, ALLOWED + (Hostile,)):
        raise Finding(f"{label}: raised {type(exc).__module__}.{type(exc).__name__}: "
                      f"{short(exc_text(exc))}") from exc
    msg = exc_text(exc)
    if len(msg) > MAX_MESSAGE:
        raise Finding(f"{label}: error message of {len(msg)} characters "
                      f"({type(exc).__name__}: {msg[:120]}...)")
    if expect == "accept" and isinstance(exc, (TypeError, ValueError, OverflowError)) \
            and not isinstance(exc, Hostile):
        raise Finding(f"{label}: refused with {type(exc).__name__}: {short(msg)}; must be accepted")
    if world is not None:
        after = world.snapshot()
        if after != before:
            diff = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                    if before.get(k) != after.get(k)}
            raise Finding(f"{label}: refused with {type(exc).__name__}: {short(msg)}, but the "
                          f"state changed: {short(diff, 600)}")
    return ("raised", exc)


def exc_text(exc) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a Hostile exception's own __str__
        return f"<{type(exc).__name__}>"


def short(x, n=200) -> str:
    try:
        s = x if isinstance(x, str) else repr(x)
    except Exception:  # noqa: BLE001
        s = f"<{type(x).__name__}>"
    return s if len(s) <= n else s[:n] + f"...({len(s)} chars)"


# ------------------------------------------------------------------------- entry points


@dataclass
class Entry:
    """One public entry point: its arguments (name, role), valid values made from the world's
    state, and the call. ``direct``: ``target`` is the API callable itself (so an extra
    positional argument or an unknown keyword reaches it)."""

    name: str
    params: list
    valid: Callable[[World], dict]
    target: Callable[[World], Callable]
    kwonly: tuple = ()
    direct: bool = True
    timeout_param: str | None = None      # the argument that is a blocking timeout
    undecided: bool = False               # the call waits on something undecided
    constructor: bool = False

    def call(self, world, args):
        fn = self.target(world)
        pos = [args[p] for p, _ in self.params if p not in self.kwonly]
        kw = {p: args[p] for p in self.kwonly}
        return lambda: fn(*pos, **kw)


def _req(fn):
    return lambda w: (lambda *a: w.s.transfer.schedule("r", uuid.uuid4(), fn(*a)))


AWAIT_TIMED_OUT = "await timed out"


def _await_handle(h, limit):
    """``await h`` on a new event loop, bounded by ``limit`` seconds (AWAIT_TIMED_OUT then)."""
    async def go():
        try:
            return await asyncio.wait_for(_await(h), limit)
        except asyncio.TimeoutError:
            return AWAIT_TIMED_OUT
    return asyncio.run(go())


async def _await(h):
    return await h


def _close_result(result):
    """Close what a constructor returned."""
    if isinstance(result, Scheduler):
        result.close()
    elif isinstance(result, TransferEngine):
        result.close(timeout=CALL_LIMIT)


ENTRIES: list[Entry] = [
    Entry("worker.create_slot", [("rid", "rid")], lambda w: dict(rid=w.fresh_rid()),
          lambda w: w.s.worker.create_slot),
    Entry("worker.enqueue", [("rid", "rid"), ("uuid", "uuid"), ("kind", "kind"), ("mode", "mode")],
          lambda w: dict(rid="r", uuid=uuid.uuid4(), kind=LOAD, mode=SCHEDULED),
          lambda w: w.s.worker.enqueue),
    Entry("worker.enqueue_many", [("rid", "rid"), ("uuids", "uuids"), ("kind", "kind"),
                                  ("mode", "mode")],
          lambda w: dict(rid="r", uuids=[uuid.uuid4(), uuid.uuid4()], kind=STORE, mode=SCHEDULED),
          lambda w: w.s.worker.enqueue_many),
    Entry("worker.start_next_iteration", [], lambda w: {}, lambda w: w.s.worker.start_next_iteration),
    Entry("worker.mark_layer_complete", [("layer", "int")], lambda w: dict(layer=w.next_layer()),
          lambda w: w.s.worker.mark_layer_complete),
    Entry("worker.mark_iteration_complete", [], lambda w: {},
          lambda w: w.s.worker.mark_iteration_complete),
    Entry("worker.is_complete", [("rid", "rid")], lambda w: dict(rid="busy"),
          lambda w: w.s.worker.is_complete),
    Entry("worker.take_finished", [], lambda w: {}, lambda w: w.s.worker.take_finished),
    Entry("worker.slot_status", [("rid", "rid")], lambda w: dict(rid="busy"),
          lambda w: w.s.worker.slot_status),
    Entry("worker.cancel_slot", [("rid", "rid")], lambda w: dict(rid=w.new_slot()),
          lambda w: w.s.worker.cancel_slot),
    Entry("worker.remove_slot", [("rid", "rid")], lambda w: dict(rid=w.new_slot()),
          lambda w: w.s.worker.remove_slot),
    Entry("transfer.schedule", [("rid", "rid"), ("uuid", "uuid"), ("requirement", "requirement"),
                                ("mode", "mode")],
          lambda w: dict(rid="r", uuid=uuid.uuid4(), requirement=None, mode=SCHEDULED),
          lambda w: w.s.transfer.schedule),
    Entry("transfer.schedule_many", [("rid", "rid"), ("uuids", "uuids"),
                                     ("requirement", "requirement"), ("mode", "mode")],
          lambda w: dict(rid="r", uuids=[uuid.uuid4(), uuid.uuid4()], requirement=None,
                         mode=SCHEDULED),
          lambda w: w.s.transfer.schedule_many),
    Entry("schedule(LayerComplete(layer, iteration))", [("layer", "int"), ("iteration", "int")],
          lambda w: dict(layer=1, iteration=2), _req(LayerComplete), direct=False),
    Entry("schedule(IterationComplete(iteration))", [("iteration", "int")],
          lambda w: dict(iteration=2), _req(IterationComplete), direct=False),
    Entry("schedule(LayerNameComplete(name, iteration))", [("name", "name"), ("iteration", "int")],
          lambda w: dict(name="b", iteration=2), _req(LayerNameComplete), direct=False),
    Entry("transfer.poll", [("max_items", "int"), ("timeout", "timeout")],
          lambda w: (w.drain_poll(), dict(max_items=4, timeout=0))[1],
          lambda w: w.s.transfer.poll, timeout_param="timeout", undecided=True),
    Entry("handle.wait", [("timeout", "timeout")], lambda w: dict(timeout=0),
          lambda w: w.undecided.wait, timeout_param="timeout", undecided=True),
    Entry("handle.mark_complete", [("error", "error")], lambda w: dict(error=None),
          lambda w: w.immediate().mark_complete),
    Entry("scheduler.stats", [], lambda w: {}, lambda w: w.s.stats),
    Entry("engine.submit", [("h", "handle"), ("src", "pool"), ("dst", "pool"), ("pairs", "pairs"),
                            ("layers", "layers")],
          lambda w: dict(h=w.immediate(), src=w.src, dst=w.dst, pairs=[(0, 1), (2, 3)],
                         layers=[0, 1]),
          lambda w: w.eng.submit),
    Entry("BlockPool.from_array", [("arr", "array"), ("block_dim", "block_dim")],
          lambda w: dict(arr=np.zeros((2, 4, 16), np.uint8), block_dim=1),
          lambda w: BlockPool.from_array, kwonly=("block_dim",), constructor=True),
    Entry("Scheduler", [("max_inflight", "int"), ("layer_names", "names"),
                        ("op_timeout", "duration_opt"), ("num_layers", "int_opt"),
                        ("removed_memory", "size"), ("poll_backlog", "size"),
                        ("store_starvation_s", "duration")],
          lambda w: dict(max_inflight=2, layer_names=list(NAMES), op_timeout=None, num_layers=3,
                         removed_memory=64, poll_backlog=64, store_starvation_s=0.05),
          lambda w: Scheduler,
          kwonly=("num_layers", "removed_memory", "poll_backlog", "store_starvation_s"),
          constructor=True),
    Entry("TransferEngine", [("s", "scheduler"), ("backend", "backend"), ("max_pending", "size"),
                             ("workers", "int_opt"), ("split_bytes", "size"),
                             ("event_timeout", "duration")],
          lambda w: dict(s=w.s, backend="host", max_pending=16, workers=1, split_bytes=1 << 20,
                         event_timeout=1.0),
          lambda w: TransferEngine,
          kwonly=("max_pending", "workers", "split_bytes", "event_timeout"), constructor=True),
]
ENTRY = {e.name: e for e in ENTRIES}


# Words that name an argument in an error message (besides the argument's own name).
ALIASES = {"rid": ("request", "rid"), "uuids": ("uuid",), "h": ("handle",), "src": ("pool", "source"),
           "dst": ("pool", "destination"), "pairs": ("pair", "block"), "layers": ("layer",),
           "arr": ("array", "shape", "dtype"), "name": ("layer name", "layernamecomplete"),
           "layer": ("layer",), "iteration": ("iteration",), "s": ("scheduler",),
           "layer_names": ("layer name", "layer_names")}


def names_argument(msg: str, param: str) -> bool:
    low = msg.lower()
    own = (param.lower(),) if len(param) > 2 else ()      # "h", "s": only through their aliases
    return any(w in low for w in own + ALIASES.get(param, ()))


def expectation(roles_kinds) -> str:
    """Combined expectation of a call whose arguments have these (role, kind) pairs (kind None:
    a valid value): refuse if any must be refused, accept if all are valid or must be accepted."""
    exp = "accept"
    for role, kind in roles_kinds:
        if kind is None:
            continue
        r = ROLES[role]
        if kind in r.refuse:
            return "refuse"
        if kind not in r.accept:
            exp = "either"
    return exp


def hostile_call(world: World, entry: Entry, replace: dict[str, str]):
    """Call ``entry`` with valid arguments except those in ``replace`` (param -> kind).
    Returns None when the world's state gives no valid arguments (e.g. the scheduler is closed
    or slot "r" was removed)."""
    try:
        args = entry.valid(world)
    except KvschedError:
        return None
    roles_kinds = []
    for p, role in entry.params:
        kind = replace.get(p)
        if kind is not None:
            args[p] = KINDS[kind][1](args[p])
            FIGURES["kinds"][kind] += 1
        roles_kinds.append((role, kind))
    exp = expectation(roles_kinds)
    label = f"{entry.name}(" + ", ".join(
        f"{p}=<{replace[p]}>" if p in replace else f"{p}={short(args[p], 40)}"
        for p, _ in entry.params) + ")"
    FIGURES["entries"][entry.name] += 1
    tparam = entry.timeout_param
    block = nominal_seconds(args[tparam]) if tparam in replace else 0.0
    try:
        call = entry.call(world, args)
    except KvschedError:
        return None
    res = attempt(None if entry.constructor else world, label, call, exp,
                  may_block=block, undecided_probe=entry.undecided)
    if entry.constructor and res[0] == "ok":
        _close_result(res[1])
    if res[0] == "raised" and len(replace) == 1 and not world.s.closed:
        (param,) = replace
        exc = res[1]
        if isinstance(exc, (TypeError, ValueError, OverflowError)) and not isinstance(exc, Hostile) \
                and not names_argument(exc_text(exc), param):
            raise Finding(f"{label}: refused with {type(exc).__name__}: {short(exc_text(exc))}; "
                          f"the message does not name the argument {param!r}")
    if res[0] == "ok" and entry.name == "worker.create_slot":
        world.rids.append(args["rid"])
    return res


def extra_args_call(world: World, entry: Entry, how: str):
    try:
        args = entry.valid(world)
        fn = entry.target(world)
    except KvschedError:
        return None
    pos = [args[p] for p, _ in entry.params if p not in entry.kwonly]
    kw = {p: args[p] for p in entry.kwonly}
    FIGURES["kinds"][how] += 1
    if how == "extra_positional":
        call = lambda: fn(*pos, None, **kw) if not entry.kwonly else fn(*pos, 1, 2, 3, 4, 5, 6, 7, **kw)  # noqa: E731
    else:
        call = lambda: fn(*pos, **kw, bogus_argument=1)  # noqa: E731
    res = attempt(None if entry.constructor else world, f"{entry.name} with {how}", call, "refuse")
    if entry.constructor and res[0] == "ok":
        _close_result(res[1])
    return res


# ------------------------------------------------------------------------- the sweep


def isolated(fn: Callable[[Callable[[str], None]], list], deadline: float = 60.0) -> list:
    """fn(note) -> findings, run in a forked child (``note(text)`` adds a finding at once, so it
    comes back even if the child then hangs) with its address space capped (2 GiB above what
    it has), so that a constructor that starts threads or allocates without bound (e.g.
    ``workers=10**400``) fails there instead of taking the test run down. Without fork (not
    Linux), fn runs here."""
    if not CAN_FORK:
        found: list = []
        return found + fn(found.append)
    findings: list[str] = []

    def child(report):
        import resource
        with open("/proc/self/status") as f:
            vm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
        limit = vm + (2 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            found = fn(lambda text: report("F " + text))
        except Finding as e:      # a hang: its thread cannot be stopped, so stop here
            found = [str(e)]
        for f in found:
            report("F " + f)
    status, lines = run_in_fork(child, deadline)
    findings += [ln[2:] for ln in lines if ln.startswith("F ")]
    findings += [ln for ln in lines if ln.startswith("FAIL")]
    if status is None:
        findings.append(f"an isolated run did not finish within {deadline} s")
    elif status != 0 and not findings:
        findings.append(f"an isolated run exited with status {status}")
    return findings


def _sweep_constructor(entry: Entry, findings: list):
    """The constructor sweep, in isolated children: a child stops at its first finding (a
    constructor that failed may have left threads behind) and the next child goes on from the
    following kind."""
    for p, _ in entry.params:
        kinds = sorted(KINDS)
        i = 0
        while i < len(kinds):
            def run(note, start=i):
                for j in range(start, len(kinds)):
                    note(f"K {j}")
                    world = World()
                    try:
                        hostile_call(world, entry, {p: kinds[j]})
                    except Finding as f:
                        return [f"K {j}", str(f)]
                    finally:
                        world.close()
                return [f"K {len(kinds)}"]
            found = isolated(run)
            done = [int(x[2:]) for x in found if x.startswith("K ")]
            findings += [x for x in found if not x.startswith("K ")]
            i = (max(done) if done else i) + 1
        if entry.direct:
            for how in ("extra_positional", "unknown_kwarg"):
                def run_extra(note, how=how):
                    world = World()
                    try:
                        extra_args_call(world, entry, how)
                    except Finding as f:
                        return [str(f)]
                    finally:
                        world.close()
                    return []
                findings += isolated(run_extra)


def _sweep_one(entry: Entry, findings: list):
    if entry.constructor and CAN_FORK:
        _sweep_constructor(entry, findings)
    else:
        _sweep_entry(entry, findings)


def _sweep_entry(entry: Entry, findings: list):
    world = World()
    try:
        for p, role in entry.params or [(None, None)]:
            for kind in (KINDS if p is not None else ()):
                if world.s.closed:      # a long wait was woken by close(): start again
                    world.close()
                    world = World()
                try:
                    hostile_call(world, entry, {p: kind})
                    world.check_invariants()
                except Finding as f:
                    findings.append(str(f))
                    world.close()
                    world = World()
                except AssertionError as f:
                    findings.append(f"after {entry.name}({p}=<{kind}>): {f}".split("\n")[0])
                    world.close()
                    world = World()
        if entry.direct:
            for how in ("extra_positional", "unknown_kwarg"):
                try:
                    extra_args_call(world, entry, how)
                except Finding as f:
                    findings.append(str(f))
    finally:
        world.close()


@pytest.mark.timeout(120 if not LONG else 600)
def test_sweep():
    """Every entry point x every argument x every kind of hostile value, once, deterministically;
    then two and three arguments replaced at once (a fixed pseudo-random sample)."""
    findings: list[str] = []
    for entry in ENTRIES:
        _sweep_one(entry, findings)
    rng = np.random.default_rng(10)
    kinds = sorted(KINDS)
    world = World()
    try:
        for i in range(400 if not LONG else 5000):
            entry = ENTRIES[rng.integers(len(ENTRIES))]
            if len(entry.params) < 2 or entry.constructor:
                continue
            n = int(rng.integers(2, min(3, len(entry.params)) + 1))
            ps = rng.choice(len(entry.params), size=n, replace=False)
            replace = {entry.params[j][0]: kinds[rng.integers(len(kinds))] for j in ps}
            if world.s.closed:
                world.close()
                world = World()
            try:
                hostile_call(world, entry, replace)
                world.check_invariants()
            except Finding as f:
                findings.append(str(f))
                world.close()
                world = World()
            except AssertionError as f:
                findings.append(f"after {entry.name}({replace}): {f}".split("\n")[0])
                world.close()
                world = World()
    finally:
        world.close()
    report_findings("sweep", findings)


def report_findings(name, findings):
    distinct = list(dict.fromkeys(findings))
    if distinct:
        text = "\n".join(f"  {i + 1}. {f}" for i, f in enumerate(distinct))
        pytest.fail(f"{name}: {len(distinct)} failing calls:\n{text}", pytrace=False)


# ------------------------------------------------------------------------- contextual cases


def _contextual_cases():
    """(kind, label, expect, fn(world) -> callable) of hostile situations."""

    def ended(w):
        h = w.immediate()
        h.mark_complete()
        return lambda: w.eng.submit(h, w.src, w.dst, [(0, 5)], None)

    def ended_by_engine(w):
        h = w.immediate()
        w.eng.submit(h, w.src, w.dst, [(1, 6)], None)
        w.eng.wait_idle(CALL_LIMIT)
        w.dst_arr[:, 6] = 0
        return lambda: w.eng.submit(h, w.src, w.dst, [(1, 6)], None)

    def twice(w):
        h = w.immediate()
        w.eng.submit(h, w.src, w.dst, [(2, 7)], None)
        return lambda: w.eng.submit(h, w.src, w.dst, [(2, 7)], None)

    def mark_twice(w):
        h = w.immediate()
        h.mark_complete()
        return lambda: h.mark_complete()

    def foreign(w):
        u = uuid.uuid4()
        w.other.worker.create_slot("f")
        w.other.worker.enqueue("f", u, LOAD, IMMEDIATE)
        h = w.other.transfer.schedule("f", u, None, IMMEDIATE)
        w.keep.append(h)
        return lambda: w.eng.submit(h, w.src, w.dst, [(0, 4)], None)

    def readonly_after_pool(w):
        arr = np.zeros_like(w.src_arr)
        pool = BlockPool.from_array(arr)
        arr.setflags(write=False)
        w.keep.append(arr)
        h = w.immediate()

        def written():
            w.eng.wait_idle(CALL_LIMIT)
            assert not arr.any(), "bytes were written into the read-only array"
        return lambda: w.eng.submit(h, w.src, pool, [(1, 2)], None), written

    def submit_with(pairs):
        def make(w):
            h = w.immediate()
            return lambda: w.eng.submit(h, w.src, w.dst, pairs, None)
        return make

    def mismatch(w):
        other = BlockPool.from_array(np.zeros((len(NAMES), BLOCKS, 2 * BLOCK_BYTES), np.uint8))
        h = w.immediate()
        return lambda: w.eng.submit(h, w.src, other, [(0, 0)], None)

    def closed_engine(w):
        w.eng.close(timeout=CALL_LIMIT)
        h = w.immediate()
        return lambda: w.eng.submit(h, w.src, w.dst, [(0, 1)], None)

    def undecided(w):
        return lambda: w.eng.submit(w.undecided, w.src, w.dst, [(0, 1)], None)

    def undecided_mark(w):
        return lambda: w.undecided.mark_complete()

    def cancelled(w):
        rid = w.new_slot()
        u = uuid.uuid4()
        w.s.worker.enqueue(rid, u, LOAD)
        h = w.s.transfer.schedule(rid, u, LayerComplete(0, 50))
        w.handles.append(h)
        w.s.worker.cancel_slot(rid)
        return lambda: w.eng.submit(h, w.src, w.dst, [(0, 1)], None)

    def pool_of(arr_fn):
        return lambda w: (lambda: BlockPool.from_array(arr_fn()))

    cases = [
        ("ended_handle", "submit of a handle the caller marked complete", "refuse", ended),
        ("ended_handle", "submit of a handle whose copy completed", "refuse", ended_by_engine),
        ("same_handle_twice", "submit of the same handle twice", "refuse", twice),
        ("same_handle_twice", "mark_complete twice", "refuse", mark_twice),
        ("foreign_handle", "submit of another scheduler's handle", "either", foreign),
        ("readonly_after_pool", "submit into an array made read-only after its pool", "refuse",
         readonly_after_pool),
        ("float_pairs", "submit with float pairs", "refuse",
         submit_with(np.array([[0.0, 1.0]]))),
        ("pairs_wrong_shape", "submit with pairs shaped (1, 3)", "refuse",
         submit_with(np.zeros((1, 3), np.int64))),
        ("pairs_out_of_range", "submit with a block id past the end", "refuse",
         submit_with([(0, BLOCKS)])),
        ("pairs_out_of_range", "submit with a negative block id", "refuse", submit_with([(-1, 0)])),
        ("pairs_out_of_range", "submit with block id 2**63", "refuse", submit_with([(2**63, 0)])),
        ("pool_mismatch", "submit between pools of different block sizes", "refuse", mismatch),
        ("closed_engine", "submit to a closed engine", "refuse", closed_engine),
        ("undecided_handle", "submit of an undecided handle", "refuse", undecided),
        ("undecided_handle", "mark_complete of an undecided handle", "refuse", undecided_mark),
        ("cancelled_handle", "submit of a CANCEL handle", "refuse", cancelled),
        ("zero_size_blocks", "from_array with zero-byte blocks", "refuse",
         pool_of(lambda: np.zeros((2, 4, 0), np.uint8))),
        ("non_contiguous_array", "from_array with a strided block dimension", "refuse",
         pool_of(lambda: np.zeros((2, 4, 16), np.uint8)[:, :, ::2])),
        ("object_dtype_array", "from_array of Python objects", "refuse",
         pool_of(lambda: np.empty((2, 4, 2), dtype=object))),
    ]
    return cases


def _closed_cases(w: World):
    """Every side call on a closed scheduler must raise (S10); handle calls must return."""
    w.s.close()
    h = w.executing
    t, wk = w.s.transfer, w.s.worker
    u = uuid.uuid4()
    refuse = [
        ("create_slot", lambda: wk.create_slot("x")),
        ("enqueue", lambda: wk.enqueue("r", u, LOAD)),
        ("enqueue_many", lambda: wk.enqueue_many("r", [uuid.uuid4()], LOAD)),
        ("start_next_iteration", wk.start_next_iteration),
        ("mark_layer_complete", lambda: wk.mark_layer_complete(0)),
        ("mark_iteration_complete", wk.mark_iteration_complete),
        ("is_complete", lambda: wk.is_complete("r")),
        ("take_finished", wk.take_finished),
        ("slot_status", lambda: wk.slot_status("r")),
        ("cancel_slot", lambda: wk.cancel_slot("r")),
        ("remove_slot", lambda: wk.remove_slot("done")),
        ("schedule", lambda: t.schedule("r", u)),
        ("schedule_many", lambda: t.schedule_many("r", [uuid.uuid4()])),
        ("poll", lambda: t.poll(4, 0.05)),
    ]
    either = [
        ("stats", w.s.stats),
        ("close again", w.s.close),
        ("wait of an undecided handle", lambda: w.undecided.wait(0.05)),
        ("wait(None) of an undecided handle", lambda: w.undecided.wait(None)),
        ("decision", lambda: w.undecided.decision),
        ("outcome", lambda: w.undecided.outcome),
        ("mark_complete of an executing handle", lambda: h.mark_complete()),
        ("with of a gated handle", lambda: _with(w.gated)),
        ("await of an undecided handle", lambda: _await_handle(w.undecided, 1.0)),
    ]
    return refuse, either


def _with(h):
    with h:
        pass


@pytest.mark.timeout(60)
def test_contextual():
    findings: list[str] = []
    for kind, label, expect, make in _contextual_cases():
        world = World()
        try:
            FIGURES["kinds"][kind] += 1
            world.eng  # made before the first snapshot
            call = make(world)
            call, post = call if isinstance(call, tuple) else (call, None)
            try:
                attempt(world, f"{label} [{kind}]", call, expect)
            finally:
                if post is not None:
                    post()
            world.check_invariants()
        except Finding as f:
            findings.append(str(f))
        except AssertionError as f:
            findings.append(f"{label} [{kind}]: {f}")
        finally:
            world.close()
    world = World()
    try:
        refuse, either = _closed_cases(world)
        FIGURES["kinds"]["closed_scheduler"] += 1
        for label, call in refuse:
            try:
                attempt(world, f"closed scheduler: {label}", call, "refuse")
            except Finding as f:
                findings.append(str(f))
        for label, call in either:
            try:
                res = attempt(None, f"closed scheduler: {label}", call, "either")
                if res == ("ok", AWAIT_TIMED_OUT):
                    findings.append(f"closed scheduler: {label}: the await did not resolve")
            except Finding as f:
                findings.append(str(f))
    finally:
        world.close()
    world = World()
    try:
        FIGURES["kinds"]["await_closed"] += 1
        closer = threading.Timer(0.1, world.s.close)
        closer.start()
        t0 = time.perf_counter()
        res = attempt(None, "await of an undecided handle, closed mid-wait",
                      lambda: _await_handle(world.undecided, CALL_LIMIT - 1))
        if res[0] == "ok" and res[1] is EXECUTE:
            findings.append("await of an undecided handle, closed mid-wait: resolved to EXECUTE")
        if time.perf_counter() - t0 > WAKE_LIMIT:
            findings.append("await of an undecided handle: close() did not resolve it within "
                            f"{WAKE_LIMIT} s")
        closer.join()
    except Finding as f:
        findings.append(str(f))
    finally:
        world.close()
    report_findings("contextual", findings)


@pytest.mark.timeout(60)
def test_await_hostile():
    """``await h`` from two event loops at once, and a decision that comes after the loop that
    awaited the handle gave up and closed: the deciding call must succeed (it must not raise
    because a loop is gone), and every live awaiter must resume with the decision."""
    findings: list[str] = []
    world = World()
    try:
        FIGURES["kinds"]["await_two_loops"] += 1
        u = uuid.uuid4()
        h = world.s.transfer.schedule("r", u)
        world.handles.append(h)
        results: list = []
        runners = [threading.Thread(target=lambda: results.append(_await_handle(h, 3.0)))
                   for _ in range(2)]
        for th in runners:
            th.start()
        time.sleep(0.1)
        t0 = time.perf_counter()
        attempt(world, "enqueue deciding a handle awaited from two loops",
                lambda: world.s.worker.enqueue("r", u, LOAD), "accept")
        for th in runners:
            th.join(CALL_LIMIT)
        dt = time.perf_counter() - t0
        if results != [EXECUTE, EXECUTE] or dt > 1.0:
            findings.append(f"await from two loops: results {results!r} after {dt:.2f} s "
                            "(both must resume with EXECUTE)")
        if h.wait(0) is EXECUTE:
            h.mark_complete()                    # its token goes to the next operation

        FIGURES["kinds"]["await_loop_gone"] += 1
        u = uuid.uuid4()
        h2 = world.s.transfer.schedule("r", u)
        world.handles.append(h2)
        first = _await_handle(h2, 0.05)          # times out; its loop is closed on return
        if first != AWAIT_TIMED_OUT:
            findings.append(f"await of an undecided handle returned {first!r}")
        attempt(world, "enqueue deciding a handle whose awaiting loop is gone",
                lambda: world.s.worker.enqueue("r", u, LOAD), "accept")
        again = attempt(None, "await again on a new loop", lambda: _await_handle(h2, 1.0))
        if again != ("ok", EXECUTE):
            findings.append(f"await after the first loop was gone: {again!r}, want EXECUTE")
        if h2.wait(0) is not EXECUTE:
            findings.append("the handle is not EXECUTE after its awaiting loop was gone")
        world.check_invariants()
    except Finding as f:
        findings.append(str(f))
    finally:
        world.close()
    report_findings("await", findings)


# ------------------------------------------------------------------------- the state machine

PARAMS = [(e.name, p) for e in ENTRIES if not e.constructor for p, _ in e.params]


class FuzzMachine(RuleBasedStateMachine):
    """Random sequences of valid and hostile calls on one World. Valid rules build state (slots,
    joined operations, progress, marks, submits, polls); hostile rules replace one or more
    arguments of any entry point; every call is checked by ``attempt``."""

    def __init__(self):
        super().__init__()
        self.w: World | None = None

    @initialize(max_inflight=st.integers(1, 3))
    def setup(self, max_inflight):
        self.w = World(max_inflight)

    def teardown(self):
        if self.w is not None:
            self.w.close()

    def ok(self, label, fn, expect="either"):
        if self.w.s.closed:
            expect = "either"
        attempt(self.w, label, fn, expect)

    # valid calls ------------------------------------------------------------------------
    @rule(which=st.integers(0, 5), kind=st.sampled_from([LOAD, STORE]),
          mode=st.sampled_from([SCHEDULED, IMMEDIATE]),
          req=st.sampled_from([None, "layer", "iteration", "name"]), worker_first=st.booleans())
    def join(self, which, kind, mode, req, worker_first):
        w = self.w
        rid = w.rids[which % len(w.rids)]
        u = uuid.uuid4()
        it = self.w.s.stats()["iteration"] + 1
        requirement = {None: None, "layer": LayerComplete(1, it), "iteration": IterationComplete(it),
                       "name": LayerNameComplete("c", it)}[req]
        if mode is IMMEDIATE:
            requirement = None

        def enqueue():
            attempt(w, f"enqueue({rid[:20]!r}, {kind.name}, {mode.name})",
                    lambda: w.s.worker.enqueue(rid, u, kind, mode))

        if worker_first:
            enqueue()
        res = attempt(w, f"schedule({rid[:20]!r}, {requirement}, {mode.name})",
                      lambda: w.s.transfer.schedule(rid, u, requirement, mode))
        if res[0] == "ok" and res[1] is not None:
            w.handles.append(res[1])
        if not worker_first:
            enqueue()

    @rule()
    def create_slot(self):
        rid = self.w.fresh_rid()
        res = attempt(self.w, f"create_slot({rid})", lambda: self.w.s.worker.create_slot(rid))
        if res[0] == "ok":
            self.w.rids.append(rid)

    @rule(step=st.sampled_from(["next", "layer", "iteration"]))
    def progress(self, step):
        wk = self.w.s.worker
        if step == "next":
            attempt(self.w, "start_next_iteration", wk.start_next_iteration)
        elif step == "layer":
            layer = self.w.s.stats()["layers_complete"]
            attempt(self.w, f"mark_layer_complete({layer})", lambda: wk.mark_layer_complete(layer))
        else:
            attempt(self.w, "mark_iteration_complete", wk.mark_iteration_complete)

    @rule(i=st.integers(0, 255), how=st.sampled_from(["mark", "error", "with", "with raise",
                                                      "submit", "wait", "await", "decision"]))
    def use_handle(self, i, how):
        w = self.w
        h = w.handles[i % len(w.handles)]
        if how == "mark":
            fn = h.mark_complete
        elif how == "error":
            fn = lambda: h.mark_complete(error="fuzz")  # noqa: E731
        elif how == "with":
            fn = lambda: _with(h)  # noqa: E731
        elif how == "with raise":
            def fn():
                try:
                    with h:
                        raise Hostile("body")
                except Hostile:
                    pass
        elif how == "submit":
            w.eng  # made before the first snapshot
            fn = lambda: w.eng.submit(h, w.src, w.dst, [(i % BLOCKS, (i + 1) % BLOCKS)], None)  # noqa: E731
        elif how == "wait":
            fn = lambda: h.wait(0.01)  # noqa: E731
        elif how == "await":
            fn = lambda: _await_handle(h, 0.05)  # noqa: E731
        else:
            fn = lambda: h.decision  # noqa: E731
        attempt(w, f"{how} of handle {peek(h)}", fn)

    @rule()
    def poll(self):
        attempt(self.w, "poll", lambda: self.w.s.transfer.poll(8, 0))

    @rule()
    def take_finished(self):
        attempt(self.w, "take_finished", self.w.s.worker.take_finished)

    @rule(which=st.integers(0, 50), remove=st.booleans())
    def cancel_or_remove(self, which, remove):
        rids = self.w.rids[1:]          # "r" stays: the hostile calls' valid arguments use it
        rid = rids[which % len(rids)]
        wk = self.w.s.worker
        attempt(self.w, f"{'remove' if remove else 'cancel'}_slot({rid[:20]!r})",
                (lambda: wk.remove_slot(rid)) if remove else (lambda: wk.cancel_slot(rid)))

    @rule(n=st.integers(0, 19))
    def close(self, n):
        if n == 0:      # rare: most of a program runs on an open scheduler
            attempt(self.w, "close", self.w.s.close)

    # hostile calls ----------------------------------------------------------------------
    @rule(calls=st.lists(st.tuples(st.sampled_from(PARAMS), st.sampled_from(sorted(KINDS))),
                         min_size=1, max_size=8))
    def hostile(self, calls):
        for (entry_name, param), kind in calls:
            hostile_call(self.w, ENTRY[entry_name], {param: kind})

    @rule(entry_name=st.sampled_from([e.name for e in ENTRIES
                                      if not e.constructor and len(e.params) > 1]),
          data=st.data())
    def hostile_many(self, entry_name, data):
        entry = ENTRY[entry_name]
        names = [p for p, _ in entry.params]
        chosen = data.draw(st.lists(st.sampled_from(names), min_size=2, unique=True))
        replace = {p: data.draw(st.sampled_from(sorted(KINDS)), label=p) for p in chosen}
        hostile_call(self.w, entry, replace)

    @rule(entry_name=st.sampled_from([e.name for e in ENTRIES if e.direct and not e.constructor]),
          how=st.sampled_from(["extra_positional", "unknown_kwarg"]), n=st.integers(0, 3))
    def extra_args(self, entry_name, how, n):
        if n == 0:      # rarer than the other hostile rules: the sweep tried each entry point
            extra_args_call(self.w, ENTRY[entry_name], how)

    @invariant()
    def invariants(self):
        if self.w is not None:
            self.w.check_invariants()


FuzzMachine.TestCase.settings = PROFILE
TestFuzzMachine = FuzzMachine.TestCase


# ------------------------------------------------------------------------- constructors

CONSTRUCTORS = [e for e in ENTRIES if e.constructor]


@PROFILE
@given(data=st.data())
def test_constructors(data):
    """Constructors with one or more hostile arguments (random; the sweep tried each once)."""
    entry = data.draw(st.sampled_from(CONSTRUCTORS), label="entry")
    names = [p for p, _ in entry.params]
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True),
                       label="params")
    replace = {p: data.draw(st.sampled_from(sorted(KINDS)), label=p) for p in chosen}

    def run(note):
        world = World()
        try:
            hostile_call(world, entry, replace)
        except Finding as f:
            return [str(f)]
        finally:
            world.close()
        return []
    findings = isolated(run)
    report_findings("constructor", findings)
    assert not findings


DURATIONS = [1e-10, 5e-324, 1e10, 1e30, float("inf"), 9.2e9, 9.3e9, 2**63, 10**400,
             np.float32(1e10)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", DURATIONS,
                         ids=lambda v: "10**400" if type(v) is int and v > 10**300 else repr(v))
def test_durations_honoured_or_refused(value):
    """Every duration is either refused (a clean error) or honoured (issue 10.4):
    ``op_timeout`` >= 1 s does not cancel an undecided operation within 0.3 s, a tiny one cancels
    it within 2 s; ``store_starvation_s`` >= 1 s keeps LOAD before STORE."""
    findings = []
    res = attempt(None, f"Scheduler(op_timeout={value!r})", lambda: Scheduler(op_timeout=value))
    if res[0] == "ok":
        s = res[1]
        try:
            s.worker.create_slot("r")
            h = s.transfer.schedule("r", uuid.uuid4())
            d = h.wait(0.3 if value >= 1 else 2.0)
            if value >= 1 and d is not None:
                findings.append(f"op_timeout={value!r}: an undecided op was decided {d!r} "
                                f"within 0.3 s")
            if value < 1 and d is None:
                findings.append(f"op_timeout={value!r}: an undecided op was not cancelled "
                                f"within 2 s")
        finally:
            s.close()
    res = attempt(None, f"Scheduler(store_starvation_s={value!r})",
                  lambda: Scheduler(max_inflight=1, store_starvation_s=value))
    if res[0] == "ok" and value >= 1:
        s = res[1]
        try:
            w, t = s.worker, s.transfer
            w.create_slot("r")
            u0 = uuid.uuid4()
            w.enqueue("r", u0, LOAD)
            first = t.schedule("r", u0)
            assert first.wait(1) is EXECUTE
            us, ul = uuid.uuid4(), uuid.uuid4()
            w.enqueue("r", us, STORE)
            hs = t.schedule("r", us)
            w.enqueue("r", ul, LOAD)
            hl = t.schedule("r", ul)
            time.sleep(0.01)
            first.mark_complete()
            if hl.wait(1) is not EXECUTE or hs.decision is not None:
                findings.append(f"store_starvation_s={value!r}: with one token, a STORE went "
                                "before a LOAD (the bound was not honoured)")
            for h in (hl, hs):
                if h.wait(1) is EXECUTE:
                    h.mark_complete()
        finally:
            s.close()
    report_findings(f"durations {value!r}", findings)


# ------------------------------------------------------------------------- fork

# What the fork tests assert: a forked child that uses (or merely drops) a scheduler or an
# engine inherited from its parent finishes every step within a deadline and exits, also at
# interpreter exit; every call on an inherited object raises promptly a KvschedError whose
# message says "fork", except close(), which may also return (cleanup code in a child must not
# fail); a scheduler and an engine made in the child work normally, and its op_timeout fires
# there. The child prints what each call did (shown with -s or on failure).

FORK_DEADLINE = 5.0
needs_fork = pytest.mark.skipif(not CAN_FORK, reason="fork tests run on Linux")


def run_in_fork(child: Callable[[Callable[[str], None]], None], deadline: float = FORK_DEADLINE):
    """Run child(report) in a forked child. ``report(line)`` sends a line to the parent.
    Returns (exit code or None if killed at the deadline, lines)."""
    FIGURES["kinds"]["forked_child"] += 1
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 70
        try:
            os.close(r)

            def report(line: str):
                os.write(wfd, (line.replace("\n", " ")[:2000] + "\n").encode())
            child(report)
            code = 0
        except AssertionError as e:
            try:
                os.write(wfd, f"FAIL {e}\n".encode()[:4000])
            except Exception:  # noqa: BLE001
                pass
            code = 1
        except BaseException as e:  # noqa: BLE001
            try:
                os.write(wfd, f"FAIL {type(e).__name__}: {e}\n".encode()[:4000])
            except Exception:  # noqa: BLE001
                pass
            code = 2
        finally:
            os._exit(code)
    os.close(wfd)
    os.set_blocking(r, False)
    buf = b""
    end = time.monotonic() + deadline
    status = None
    while True:
        try:
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                buf += chunk
        except BlockingIOError:
            pass
        done, st_ = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st_)
            break
        if time.monotonic() > end:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    try:
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    except BlockingIOError:
        pass
    os.close(r)
    return status, buf.decode(errors="replace").splitlines()


def _check_fork(status, lines, what):
    print(f"\n[fork] {what}:\n  " + "\n  ".join(lines))
    last = [ln for ln in lines if ln.startswith("step ")]
    if status is None:
        pytest.fail(f"{what}: the forked child hung (killed after {FORK_DEADLINE} s); last step: "
                    f"{last[-1] if last else '-'}", pytrace=False)
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    assert status == 0 and not fails, f"{what}: child exit {status}: {fails}"


def _fork_case(objs: dict, child, what: str) -> list[str]:
    """Run ``child`` in a forked child, close the parent's objects whatever happened, and check
    the child's report (exit 0, no FAIL line). Returns the report's lines."""
    try:
        status, lines = run_in_fork(child)
    finally:
        _parent_close(objs)
    _check_fork(status, lines, what)
    return lines


def _child_call(report, name, fn, limit=2.0, fork_error=True):
    """In a child: one call on inherited objects, reported before and after; it must end within
    ``limit`` and (``fork_error``) raise a KvschedError that says "fork"."""
    report(f"step {name}")
    t0 = time.perf_counter()
    try:
        v = fn()
        out = f"returned {short(v, 80)}"
        exc = None
    except BaseException as e:  # noqa: BLE001
        out = f"raised {type(e).__name__}: {short(exc_text(e), 160)}"
        exc = e
    dt = time.perf_counter() - t0
    report(f"  {name}: {out} ({dt * 1e3:.1f} ms)")
    assert dt <= limit, f"{name} took {dt:.2f} s in the child"
    assert exc is None or isinstance(exc, ALLOWED), f"{name}: {out}"
    if fork_error:
        assert isinstance(exc, KvschedError) and "fork" in exc_text(exc).lower(), (
            f"{name} on an inherited object: {out}; want a KvschedError that says fork")
    return exc


def _parent_state() -> dict:
    """A scheduler with op_timeout, an undecided op, an EXECUTE op and a host engine, held only
    by the returned dict (so a child can drop every reference)."""
    s = Scheduler(max_inflight=2, op_timeout=0.5)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    pending = t.schedule("r", uuid.uuid4())            # undecided: its worker half never comes
    u = uuid.uuid4()
    w.enqueue("r", u, LOAD, IMMEDIATE)
    ready = t.schedule("r", u, None, IMMEDIATE)          # EXECUTE
    eng = TransferEngine(s, backend="host", workers=1)
    src = np.arange(2 * 4 * 16, dtype=np.uint8).reshape(2, 4, 16)
    dst = np.zeros_like(src)
    return dict(s=s, eng=eng, pending=pending, ready=ready, src=BlockPool.from_array(src),
                dst=BlockPool.from_array(dst))


def _parent_close(objs: dict):
    objs["ready"].mark_complete()
    objs["eng"].close(timeout=CALL_LIMIT)
    objs["s"].close()


@needs_fork
@pytest.mark.timeout(60)
def test_fork_child_calls_on_inherited_objects():
    objs = _parent_state()

    def child(report):
        s, eng, pending, ready = objs["s"], objs["eng"], objs["pending"], objs["ready"]
        w, t = s.worker, s.transfer
        failures = []

        def c(name, fn, fork_error=True):
            try:
                _child_call(report, name, fn, fork_error=fork_error)
            except AssertionError as e:     # go on: report every call that misbehaves
                failures.append(str(e))
        c("stats", s.stats)
        c("create_slot", lambda: w.create_slot("c"))
        c("enqueue", lambda: w.enqueue("r", uuid.uuid4(), LOAD))
        c("schedule", lambda: t.schedule("r", uuid.uuid4()))
        c("start_next_iteration", w.start_next_iteration)
        c("poll", lambda: t.poll(4, 0.05))
        c("wait", lambda: pending.wait(0.05))
        c("decision", lambda: pending.decision)
        c("is_complete", lambda: w.is_complete("r"))
        c("take_finished", w.take_finished)
        c("slot_status", lambda: w.slot_status("r"))
        c("submit", lambda: eng.submit(ready, objs["src"], objs["dst"], [(0, 1)], None))
        c("engine.stats", eng.stats)
        c("engine.close(timeout=1)", lambda: eng.close(timeout=1), fork_error=False)
        c("cancel_slot", lambda: w.cancel_slot("r"))
        c("mark_complete", ready.mark_complete)
        c("close", s.close, fork_error=False)
        assert not failures, "; ".join(failures)

    _fork_case(objs, child, "calls on an inherited scheduler and engine")


@needs_fork
@pytest.mark.timeout(60)
def test_fork_child_drops_inherited_scheduler():
    """Dropping an inherited scheduler with op_timeout and a pending operation (issue 10.1)."""
    objs = _parent_state()

    def child(report):
        assert objs["s"].closed, "an inherited scheduler must read as closed in the child"
        report("step drop every inherited object + gc.collect()")
        objs.clear()
        gc.collect()
        report("  dropped")

    parent = dict(objs)  # the child clears its copy of the dict, not the parent's
    lines = _fork_case(objs, child, "dropping an inherited scheduler")
    assert lines[-1] == "  dropped", f"the child stopped before the drop ended: {lines}"
    assert parent["s"].closed  # closed by _fork_case in the parent, unharmed by the child


@needs_fork
@pytest.mark.timeout(60)
def test_fork_child_engine_submit_then_close():
    """submit on an inherited engine, then close() without a timeout (issue 10.1)."""
    objs = _parent_state()

    def child(report):
        eng = objs["eng"]
        _child_call(report, "submit",
                    lambda: eng.submit(objs["ready"], objs["src"], objs["dst"], [(0, 1)], None))
        _child_call(report, "engine.close()", eng.close, limit=5.0, fork_error=False)

    lines = _fork_case(objs, child, "submit then close() on an inherited engine")
    submit = next(ln for ln in lines if ln.startswith("  submit:"))
    assert "raised" in submit and "fork" in submit.lower(), submit
    close = next(ln for ln in lines if ln.startswith("  engine.close():"))
    assert close.startswith("  engine.close(): returned"), close


@needs_fork
@pytest.mark.timeout(60)
def test_fork_child_new_objects_work():
    """Objects made in the child work: a full lifecycle, a copy, and op_timeout firing."""
    objs = _parent_state()

    def child(report):
        report("step new scheduler")
        with Scheduler(op_timeout=0.2) as s2:
            w, t = s2.worker, s2.transfer
            w.create_slot("x")
            u = uuid.uuid4()
            w.enqueue("x", u, LOAD)
            h = t.schedule("x", u)
            assert h.wait(2) is EXECUTE, "a joined op was not decided in the child"
            a = np.arange(64, dtype=np.uint8).reshape(2, 2, 16)
            b = np.zeros_like(a)
            with TransferEngine(s2, backend="host", workers=1) as e2:
                e2.submit(h, BlockPool.from_array(a), BlockPool.from_array(b), [(0, 1)], None)
                assert e2.wait_idle(5), "a copy in the child did not finish"
            assert (b[:, 1] == a[:, 0]).all(), "the child's copy is wrong"
            assert w.is_complete("x")
            late = t.schedule("x", uuid.uuid4())
            assert late.wait(3) is CANCEL, "op_timeout did not fire in the child"
        report("  new objects work")

    _fork_case(objs, child, "new objects in a forked child")


FORK_EXIT_SCRIPT = textwrap.dedent("""
    import os, sys, time, uuid
    import kvsched
    s = kvsched.Scheduler(op_timeout=0.5)
    s.worker.create_slot("r")
    h = s.transfer.schedule("r", uuid.uuid4())
    eng = kvsched.TransferEngine(s, backend="host", workers=1)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)          # the child ends normally: interpreter exit drops s, h and eng
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("child exit", os.waitstatus_to_exitcode(status))
            eng.close(timeout=5)
            s.close()
            sys.exit(0)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("child hung at interpreter exit")
    os._exit(3)
""")


@needs_fork
@pytest.mark.timeout(60)
def test_fork_child_interpreter_exit():
    """A child that exits normally while holding an inherited scheduler (with op_timeout and a
    pending operation) and engine: interpreter exit must not hang (issue 10.1)."""
    proc = subprocess.run([sys.executable, "-c", FORK_EXIT_SCRIPT, str(FORK_DEADLINE)],
                          capture_output=True, text=True, timeout=FORK_DEADLINE + 30)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert "child exit 0" in proc.stdout, (proc.stdout + proc.stderr)[-2000:]


# ------------------------------------------------------------------------- the catalogue


def test_bad_input_kinds():
    """The catalogue that docs/reliability.md cites: at least 30 distinct kinds, each described
    and each used by a test of this file."""
    assert len(BAD_INPUT_KINDS) >= 30
    assert len(set(BAD_INPUT_KINDS)) == len(KINDS) + len(CONTEXT_KINDS)
    assert all(isinstance(d, str) and d for d in BAD_INPUT_KINDS.values())
    assert set().union(*GROUPS) == set(KINDS), set(KINDS) ^ set().union(*GROUPS)
    for role in ROLES.values():
        assert role.refuse <= set(KINDS) and role.accept <= set(KINDS)
    source = open(__file__, encoding="utf-8").read()
    for kind in CONTEXT_KINDS:
        assert source.count(f'"{kind}"') >= 2, f"context kind {kind} is used by no test"
    print(f"\n[kvsched fuzz] {len(BAD_INPUT_KINDS)} kinds of bad input "
          f"({len(KINDS)} values, {len(CONTEXT_KINDS)} situations)")


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    figs = {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in FIGURES.items()}
    figs["kinds_covered"] = len(FIGURES["kinds"])
    figs["bad_input_kinds"] = len(BAD_INPUT_KINDS)
    figs["max_examples"] = PROFILE.max_examples
    write_report("api_fuzz", figs)
