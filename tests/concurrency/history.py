"""Histories of concurrent runs and their checkers (STYLE.md B2, B5, B7).

A :class:`Recorder` gives each thread its own event list (no lock on the hot path); every event
is ``(t_call, t_return, thread, rid, op, args, result)`` with ``time.perf_counter_ns`` stamps.

:func:`check_linearizable` checks the events of one rid against :class:`RidModel`, a sequential
model of one request (S1, S4-S6, S10 as seen by one rid). Operations of different rids interact
only through the token pool (and progress), so the history is checked per rid (P-compositionality,
porcupine). The model is nondeterministic about *when* a joined SCHEDULED operation is decided
EXECUTE (tokens and gating are global): it keeps a set of possible states, and a joined,
undecided operation may become EXECUTE whenever an observation needs it, or stay undecided.

Search: Wing-Gong over the rid's events. An event may be linearized next if it was called before
every pending event returned; sets of model states are memoised per set of linearized events.
Events that do not overlap are therefore replayed in order, and only overlapping windows are
permuted. Two observations are stamped as points: a wait() that returned a decision is placed at
its return (a decision never changes once made), a wait() that timed out at its call (an
undecided operation was undecided at the call too).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from figures import STRESS, write_report  # noqa: F401 (re-exported to the tests)

SCALE = 10 if STRESS == "long" else 1

E, C = "EXECUTE", "CANCEL"


def guarded(barrier, failures, fn, *args):
    """A thread body: wait at ``barrier`` (so every thread starts together), run ``fn(*args)``,
    and record any exception in ``failures`` as (thread name, repr) for the main thread."""
    def run():
        try:
            barrier.wait(10)
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append((threading.current_thread().name, repr(e)))
    return run


# ------------------------------------------------------------------------------- recording
@dataclass
class Event:
    t0: int
    t1: int
    thread: str
    rid: str | None           # None: a global event (close)
    op: str
    args: tuple
    result: Any               # a value, or ("raise", ExceptionClassName)

    def __repr__(self):
        return (f"[{self.t0 / 1e6:.3f}..{self.t1 / 1e6:.3f} ms {self.thread}] "
                f"{self.op}{self.args} -> {self.result}")


class Recorder:
    def __init__(self):
        self._local = threading.local()
        self._lists = []
        self._lock = threading.Lock()
        self.origin = time.perf_counter_ns()

    def _list(self):
        lst = getattr(self._local, "events", None)
        if lst is None:
            lst = self._local.events = []
            with self._lock:
                self._lists.append(lst)
        return lst

    def call(self, rid, op, args, fn, *, point=None):
        """Run fn(), record it, return its value or re-raise. ``point``: see module doc."""
        t0 = time.perf_counter_ns() - self.origin
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - recorded, then re-raised
            t1 = time.perf_counter_ns() - self.origin
            self._list().append(Event(t0, t1, threading.current_thread().name, rid, op, args,
                                      ("raise", type(e).__name__)))
            raise
        t1 = time.perf_counter_ns() - self.origin
        result = _summary(op, value)
        if point == "return_if_decided":
            t0 = t1 if result is not None else t0
            t1 = t1 if result is not None else t0
        self._list().append(Event(t0, t1, threading.current_thread().name, rid, op, args, result))
        return value

    def close(self, fn):
        """Record close() as ("close", [call, return]) and ("close_end", point at return)."""
        self.call(None, "close", (), fn)
        t1 = self._list()[-1].t1
        self._list().append(Event(t1, t1, threading.current_thread().name, None, "close_end",
                                  (), None))

    def events(self):
        with self._lock:
            out = [e for lst in self._lists for e in lst]
        out.sort(key=lambda e: (e.t0, e.t1))
        return out


def _summary(op, value):
    if op == "schedule":
        return None  # the handle; its decision is observed by wait
    if op == "wait":
        return None if value is None else value.name
    if op == "slot_status":
        return (value.expected, value.completed, value.failed, value.cancelled)
    return value


# ------------------------------------------------------------------------------- per-rid model
# State of one rid: (slot, rid_cancelled, removed, ops)
#   slot: None, or (cancelled flag, frozenset of uuids its worker enqueued)
#   removed: sorted tuple of (uuid, decision) of the operations of removed slots (remembered;
#            the tests keep the memory large); a late transfer half for one is decided CANCEL
#   ops: tuple of sorted (uuid, (has_w, has_t, mode, decision, outcome)); decision None/E/C,
#        outcome None/"completed"/"failed"/"cancelled"
#   closed: bool
OPEN = None


def initial_state():
    return (None, False, (), (), False)


def _ops(state):
    return dict(state[3])


def _with(state, slot=..., rid_cancelled=..., removed=..., ops=..., closed=...):
    s, rc, rm, o, cl = state
    return (s if slot is ... else slot, rc if rid_cancelled is ... else rid_cancelled,
            rm if removed is ... else removed, o if ops is ... else tuple(sorted(ops.items())),
            cl if closed is ... else closed)


def _ended(op):
    return op[4] is not None


def _slot_counts(state):
    slot = state[0]
    ops = _ops(state)
    mine = [ops[u] for u in slot[1]]
    return (len(mine), sum(o[4] == "completed" for o in mine), sum(o[4] == "failed" for o in mine),
            sum(o[4] == "cancelled" for o in mine))


def _cancel_undecided(ops, us):
    """Every undecided SCHEDULED op among ``us``: a joined one may have been decided EXECUTE
    before (then it stays EXECUTE) or not (then it is cancelled): all combinations."""
    choices = []
    for u in us:
        hw, ht, mode, d, out = ops[u]
        if mode != "S" or d is not None:
            continue
        if hw and ht:
            choices.append([(u, (hw, ht, mode, E, out)), (u, (hw, ht, mode, C, "cancelled"))])
        else:
            choices.append([(u, (hw, ht, mode, C, "cancelled"))])
    for combo in itertools.product(*choices):
        new = dict(ops)
        new.update(combo)
        yield new


def step(state, ev):
    """The states ``state`` may move to when ``ev`` (with its recorded result) takes effect
    atomically; an empty list when the result is impossible from ``state``."""
    slot, rid_cancelled, removed, ops_t, closed = state
    ops = dict(ops_t)
    op, res = ev.op, ev.result
    raised = res[1] if isinstance(res, tuple) and len(res) == 2 and res[0] == "raise" else None

    if op == "close":
        # close() is not one atomic step: it marks the scheduler closed (every later call raises
        # SchedulerClosedError) and then cancels the undecided operations one by one, so between
        # its call and its return an operation may be seen undecided or CANCEL. "close_end"
        # (a point at close's return) is where every undecided operation must be CANCEL.
        return [_with(state, closed=True)]
    if op == "close_end":
        return [_with(state, ops=new) for new in _cancel_undecided(ops, list(ops))]
    if closed and op not in ("wait", "mark", "second_mark", "drop", "close_end"):
        # every call but the handle's own methods raises after close (S10); an EXECUTE handle
        # can still be marked, so executing copies can report their end
        return [state] if raised == "SchedulerClosedError" else []
    if op in ("create_slot", "enqueue", "schedule", "cancel_slot", "remove_slot", "is_complete",
              "slot_status") and raised == "SchedulerClosedError":
        return []  # not closed (checked above)

    if op == "create_slot":
        if slot is not None:
            return [state] if raised == "SlotExistsError" else []
        return [_with(state, slot=(False, frozenset()), rid_cancelled=False)] if raised is None else []

    if op == "enqueue":
        u, mode = ev.args
        if slot is None:
            return [state] if raised == "UnknownSlotError" else []
        if raised is not None:
            return []
        if u in ops and ops[u][0]:
            return []  # the tests never enqueue a uuid twice
        hw, ht, m, d, out = ops.get(u, (False, False, mode, None, None))
        if ht and m != mode:
            return []
        if mode == "S" and d is None and slot[0]:
            d, out = C, "cancelled"      # into a cancelled slot: decided CANCEL at once
        ops[u] = (True, ht, mode, d, out)
        return [_with(state, slot=(slot[0], slot[1] | {u}), ops=ops)]

    if op == "schedule":
        u, mode = ev.args
        if raised is not None:
            return []
        if u in ops and ops[u][1]:
            return []  # never twice in these tests
        if u in dict(removed) and u not in ops:
            return [state] if mode == "S" else []   # late half of a removed slot: CANCEL, detached
        hw, ht, m, d, out = ops.get(u, (False, False, mode, None, None))
        if hw and m != mode:
            return []
        if mode == "I":
            d = E
        elif d is None and not hw and rid_cancelled:
            d, out = C, "cancelled"
        ops[u] = (hw, True, mode, d, out)
        return [_with(state, ops=ops)]

    if op == "cancel_slot":
        if raised is not None:
            return []
        us = [u for u, o in ops.items() if (slot is not None and u in slot[1]) or (o[1] and not o[0])]
        new_slot = (True, slot[1]) if slot is not None else None
        return [_with(state, slot=new_slot, rid_cancelled=True, ops=new)
                for new in _cancel_undecided(ops, us)]

    if op == "remove_slot":
        if slot is None:
            return [state] if raised == "UnknownSlotError" else []
        complete = all(_ended(ops[u]) for u in slot[1])
        if not complete:
            return [state] if raised == "SlotBusyError" else []
        if raised is not None:
            return []
        gone = dict(removed)
        for u in slot[1]:
            gone[u] = ops.pop(u)[3]
        return [_with(state, slot=None, removed=tuple(sorted(gone.items())), ops=ops)]

    if op == "is_complete":
        if slot is None:
            return [state] if raised == "UnknownSlotError" else []
        return [state] if res == all(_ended(ops[u]) for u in slot[1]) else []

    if op == "slot_status":
        if slot is None:
            return [state] if raised == "UnknownSlotError" else []
        return [state] if res == _slot_counts(state) else []

    if op in ("wait", "mark", "drop", "second_mark"):
        u = ev.args[0]
        gone = dict(removed)
        if u in gone and u not in ops:
            # an op of a removed slot (ended), or a late transfer half of one (CANCEL, detached)
            if op == "wait":
                return [state] if res == gone[u] else []
            return [state] if raised == "ProtocolError" or op == "drop" else []
        if u not in ops:
            return []
        hw, ht, mode, d, out = ops[u]
        candidates = [(d, out)]
        if d is None and hw and ht and mode == "S":
            candidates.append((E, out))  # it may have been decided EXECUTE by now
        if d is None and closed and mode == "S":
            candidates.append((C, "cancelled"))  # close() in progress reached it
        result = []
        for d2, out2 in candidates:
            if op == "wait":
                if (res is None and d2 is None) or (res is not None and res == d2):
                    ops[u] = (hw, ht, mode, d2, out2)
                    result.append(_with(state, ops=ops))
            elif op in ("mark", "second_mark"):
                ok_mark = d2 == E and out2 is None
                if ok_mark and raised is None:
                    ops[u] = (hw, ht, mode, d2, ev.args[1])
                    result.append(_with(state, ops=ops))
                elif not ok_mark and raised == "ProtocolError":
                    ops[u] = (hw, ht, mode, d2, out2)
                    result.append(_with(state, ops=ops))
            elif op == "drop":
                # only delivered EXECUTE handles are dropped by the tests: an open one fails
                if d2 == E:
                    ops[u] = (hw, ht, mode, d2, out2 if out2 is not None else "failed")
                    result.append(_with(state, ops=ops))
        return result
    raise AssertionError(f"unknown op {op}")


class NotLinearizable(AssertionError):
    pass


def check_linearizable(events, initial=None, max_nodes=2_000_000):
    """Wing-Gong search with memoisation (iterative: histories of one rid can be long); raises
    NotLinearizable with the events around the deepest prefix reached. Returns the number of
    search nodes visited."""
    events = sorted(events, key=lambda e: (e.t0, e.t1))
    n = len(events)
    if n == 0:
        return 0
    start = frozenset([initial if initial is not None else initial_state()])
    seen = set()
    nodes = 0
    best = [0, start]   # deepest prefix reached, and the state set there

    def children(done, states, lo):
        """(next done, next states, next lo) for every event that may be linearized next."""
        while done >> lo & 1:
            lo += 1
        min_t1 = min(events[i].t1 for i in range(lo, n) if not done >> i & 1)
        for i in range(lo, n):
            if done >> i & 1:
                continue
            ev = events[i]
            if ev.t0 > min_t1:
                break
            nxt = set()
            for st in states:
                nxt.update(step(st, ev))
            if nxt:
                yield done | 1 << i, frozenset(nxt), lo

    stack = [(0, children(0, start, 0))]
    while stack:
        count, it = stack[-1]
        child = next(it, None)
        if child is None:
            stack.pop()
            continue
        done, states, lo = child
        if count + 1 == n:
            return nodes
        key = (done, states)
        if key in seen:
            continue
        seen.add(key)
        nodes += 1
        if nodes > max_nodes:
            raise NotLinearizable(f"search budget exceeded ({max_nodes} nodes) for {n} events")
        if count + 1 > best[0]:
            best[0], best[1] = count + 1, states
        stack.append((count + 1, children(done, states, lo)))
    depth = best[0]
    window = events[max(0, depth - 6): depth + 6]
    raise NotLinearizable(
        f"not linearizable after {depth} of {n} events; states there: "
        f"{sorted(map(str, best[1]))[:4]}\n" + "\n".join(map(repr, window)))


# ------------------------------------------------------------------------------- ledger
class Ledger:
    """Terminal events per uuid, recorded by the test's threads under one lock (B7)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.terminal = collections.defaultdict(list)   # uuid -> [outcome, ...]
        self.running = 0
        self.peak_running = 0

    def end(self, u, outcome):
        with self.lock:
            self.terminal[u].append(outcome)

    def start_running(self, limit):
        with self.lock:
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
            assert self.running <= limit, f"{self.running} EXECUTE seen and unmarked > {limit}"

    def stop_running(self):
        with self.lock:
            self.running -= 1

    def check_exactly_once(self, uuids):
        bad = {u: self.terminal.get(u) for u in uuids if len(self.terminal.get(u, [])) != 1}
        assert not bad, f"{len(bad)} operations did not end exactly once: {list(bad.items())[:5]}"


@dataclass
class Progress:
    """The test's shadow of the worker's progress. The progress thread raises it *before* the
    call that makes it true, so it is never below the scheduler's: a requirement that does not
    hold in the shadow when EXECUTE is seen cannot have held at the decision (sound check)."""
    iteration: int = 0
    layers: int = 0
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def satisfied(self, req):
        from kvsched import IterationComplete, LayerComplete
        if req is None:
            return True
        with self.lock:
            it, layers, done = self.iteration, self.layers, self.done
        if isinstance(req, IterationComplete):
            return req.iteration < it or (req.iteration == it and done)
        assert isinstance(req, LayerComplete)
        return req.iteration < it or (req.iteration == it and (done or req.layer < layers))
