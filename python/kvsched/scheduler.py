"""`Scheduler`: the public entry point over the C++ core (contract sections 2-3, docs/contract.md).

The core (``kvsched._core``) owns all state and concurrency. This module only validates the
constructor's arguments, exposes the two sides (``worker`` and ``transfer``), and adds the
asyncio integration of handles (``await h``), which belongs in Python.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any, Sequence, TypedDict, cast

from . import _core
from ._args import check_int, check_seconds, short_repr
from .protocol import Decision, Outcome

__all__ = ["Scheduler", "SchedulerStats", "Handle", "WorkerSide", "TransferSide"]

# Ranges of the constructor's arguments (docs/semantics.md "Ranges"). Durations are whole
# nanoseconds in the core: every accepted duration is honoured as given, never wrapped or rounded
# to "never".
MAX_INFLIGHT = 2**31 - 1
MAX_MEMORY = 2**32  # removed_memory, poll_backlog: entries remembered
MAX_LAYERS = 2**24 - 2  # layer indices are 0 .. 2**24-3 (LayerComplete.layer's range)
MIN_OP_TIMEOUT_S = 1e-9  # one nanosecond: the core's resolution

Handle = _core.Handle
WorkerSide = _core.WorkerSide
TransferSide = _core.TransferSide


class _LoopNotifier:
    """The wake-up channel of one event loop: the core posts the token of every watched operation
    it decides to ``core.fd`` (an eventfd), which the loop watches with ``add_reader``. Waiting
    costs nothing: no thread, timer or poll per awaiting coroutine, and no work at all while
    nothing is decided. One future per watched operation, shared by every coroutine of this loop
    that awaits it; it stays until the decision comes (close() decides every operation)."""

    __slots__ = ("core", "futures", "tokens", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.core = _core.AsyncNotifier()
        self.futures: dict[int, asyncio.Future[None]] = {}
        self.tokens = itertools.count(1)
        loop.add_reader(self.core.fd, self._on_ready)  # the loop holds us, never the reverse

    def _on_ready(self) -> None:
        for token in self.core.drain():
            fut = self.futures.pop(token, None)
            if fut is not None and not fut.done():
                fut.set_result(None)


# Event loop -> its notifier. Weak keys: a closed, dropped loop takes its notifier with it (the
# core's operations keep the C++ notifier alive until they die, so a late post is harmless).
_loop_notifiers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopNotifier | None]" = (
    weakref.WeakKeyDictionary()
)


def _notifier_for(loop: asyncio.AbstractEventLoop) -> "_LoopNotifier | None":
    try:
        return _loop_notifiers[loop]
    except KeyError:
        pass
    try:
        notifier: _LoopNotifier | None = _LoopNotifier(loop)
    except (NotImplementedError, AttributeError, OSError, RuntimeError):
        notifier = None  # a loop that cannot watch descriptors (Windows' proactor): poll instead
    _loop_notifiers[loop] = notifier
    return notifier


async def _poll_decision(h: Any) -> Decision | None:
    """Fallback for loops without add_reader, or a handle another loop already watches: a short,
    growing sleep (0.2 ms up to 5 ms)."""
    delay = 0.0002
    while True:
        d = h.decision
        if d is not None or h._closed():
            return d
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.005)


def _handle_await(self: Any):
    """``await h``: resolves to the Decision without blocking the event loop or polling.

    The coroutine sleeps on a future of its loop's notifier; the thread that decides the operation
    posts its token and the loop wakes (see :class:`_LoopNotifier`). ``close()`` decides every
    operation, so it resolves every awaiting coroutine (to CANCEL)."""

    async def _wait() -> Decision | None:
        d = self.decision
        if d is not None:
            return d
        loop = asyncio.get_running_loop()
        notifier = _notifier_for(loop)
        if notifier is None:
            return await _poll_decision(self)
        token = self._watched_by(notifier.core)
        fut = notifier.futures.get(token) if token is not None else None
        if fut is None:
            token = next(notifier.tokens)
            fut = loop.create_future()
            notifier.futures[token] = fut
            state = self._watch(notifier.core, token)
            if state != 0:
                notifier.futures.pop(token, None)
                if state == 2:  # watched by another loop's notifier
                    return await _poll_decision(self)
                return self.decision
        if self._closed() and self.decision is None:
            return None
        # shield: a cancelled awaiter leaves the shared future to the others
        await asyncio.shield(fut)
        return self.decision

    return _wait().__await__()


Handle.__await__ = _handle_await  # type: ignore[attr-defined]

# The core reports an operation's outcome as its name ("open", "completed", ...); Handle.outcome
# turns it into the Outcome member of that value (a str too, so comparisons with the names hold).
_core_outcome = _core.Handle.outcome.fget
_OUTCOMES = {o.value: o for o in Outcome}


def _handle_outcome(self: Any) -> Outcome:
    """How the operation ended: ``Outcome.OPEN`` until then, else COMPLETED, FAILED or
    CANCELLED (a dropped handle's operation is FAILED). Each member equals its name as a str."""
    return _OUTCOMES[_core_outcome(self)]


Handle.outcome = property(_handle_outcome)  # type: ignore[attr-defined,assignment]


class SchedulerStats(TypedDict):
    """What :meth:`Scheduler.stats` returns: a plain dict with these keys, a best-effort snapshot
    (each figure is read on its own, so two figures may be a few operations apart).

    Keys ending in ``_us`` are floats in microseconds; every other key is an int. Counters only
    grow; the other ints are sizes at the moment of the call.
    """

    #: slots that exist now (created and not removed)
    slots: int
    #: ``create_slot`` calls that succeeded
    slots_created: int
    #: ``remove_slot`` calls that succeeded
    slots_removed: int
    #: worker halves accepted (``enqueue``)
    enqueued: int
    #: transfer halves accepted (``schedule``), IMMEDIATE ones included; a half decided CANCEL on
    #: arrival for a removed uuid is counted in ``late_cancelled`` only
    scheduled: int
    #: IMMEDIATE transfer halves (also in ``scheduled``)
    immediate: int
    #: operations whose two halves met
    joined: int
    #: EXECUTE decisions, both modes
    executed: int
    #: operations that ended completed
    completed: int
    #: operations that ended failed, ``dropped`` included
    failed: int
    #: operations that ended cancelled, ``timed_out`` included
    cancelled: int
    #: operations whose handle was garbage-collected unmarked, or pushed out of the poll backlog
    #: undelivered (recorded as failed, contract S4)
    dropped: int
    #: operations cancelled by ``op_timeout`` (contract S12)
    timed_out: int
    #: transfer halves decided CANCEL on arrival: their rid was cancelled, or their uuid belongs
    #: to a removed slot (contract S6)
    late_cancelled: int
    #: uuids of removed slots forgotten, oldest first, beyond ``removed_memory``
    removed_forgotten: int
    #: decided handles pushed out of the poll backlog before anybody took them (``poll_backlog``)
    backlog_evicted: int
    #: held CANCEL outcomes forgotten, oldest first, beyond ``removed_memory``
    held_forgotten: int
    #: concurrency tokens in use now (SCHEDULED operations decided EXECUTE and not ended)
    inflight: int
    #: the most tokens ever in use at once
    peak_inflight: int
    #: the token bound, ``Scheduler(max_inflight=...)``
    max_inflight: int
    #: ready operations waiting for a token
    ready_queued: int
    #: joined operations whose requirement does not hold yet
    gated: int
    #: transfer halves waiting for their worker half
    pending_transfer_halves: int
    #: CANCEL outcomes held for a worker half that has not come (docs/semantics.md)
    held_cancels: int
    #: uuids of removed slots remembered now
    removed_memory_size: int
    #: decided handles waiting for ``transfer.poll``
    poll_backlog: int
    #: rids that became complete and wait for ``take_finished``
    finished_backlog: int
    #: the current iteration (0 before the first ``start_next_iteration``)
    iteration: int
    #: layers marked complete in the current iteration; -1 once it is marked complete
    layers_complete: int
    #: dispatch latencies recorded: gated operations released by a progress mark and then
    #: decided EXECUTE
    dispatch_latency_count: int
    #: median time from the progress mark that released a gated operation to its EXECUTE
    #: decision, in microseconds
    dispatch_latency_p50_us: float
    #: 99th percentile of the same, in microseconds
    dispatch_latency_p99_us: float


class Scheduler:
    """Schedules KV-cache block transfers between the worker and the transfer side.

    Args:
        max_inflight: SCHEDULED operations decided EXECUTE and not yet ended, at most (S3).
        layer_names: names for ``LayerNameComplete`` and ``mark_layer_complete(name)``; also sets
            ``num_layers``.
        op_timeout: seconds after which an operation still undecided is cancelled (S12); None:
            never. From 1e-9 (one nanosecond) to 1e9 seconds.
        num_layers: layers per iteration, to reject out-of-range marks (S7); None: unchecked.
        removed_memory: uuids of removed slots (and cancelled request ids) remembered so that a
            late transfer half is cancelled at once (S6).
        poll_backlog: decided handles kept for ``transfer.poll`` (S4).
        store_starvation_s: a ready STORE waiting longer than this goes before loads (S3); from 0
            to 1e9 seconds.

    Integer arguments take anything with ``__index__`` (numpy integers); out-of-range values raise
    :class:`~kvsched.InvalidArgumentError` naming the argument and its range. In a process forked
    from the one that made it, a scheduler raises :class:`~kvsched.SchedulerForkedError` on every
    call (``close()`` does nothing there): make a new one in the child.
    """

    def __init__(
        self,
        max_inflight: int = 64,
        layer_names: Sequence[str] | None = None,
        op_timeout: float | None = None,
        *,
        num_layers: int | None = None,
        removed_memory: int = 65536,
        poll_backlog: int = 65536,
        store_starvation_s: float = 0.05,
    ) -> None:
        from .errors import InvalidArgumentError

        check_int("max_inflight", max_inflight, 1, MAX_INFLIGHT)
        check_int("removed_memory", removed_memory, 1, MAX_MEMORY)
        check_int("poll_backlog", poll_backlog, 1, MAX_MEMORY)
        names: list[str] = []
        if layer_names is not None:
            if isinstance(layer_names, (str, bytes)):
                raise TypeError("layer_names must be a list of str, not a single str")
            try:
                names = list(layer_names)
            except TypeError:
                raise TypeError(
                    f"layer_names must be a list of str, not {type(layer_names).__name__}"
                ) from None
            for n in names:
                if not isinstance(n, str):
                    raise TypeError(f"layer names must be str, not {type(n).__name__}")
                try:
                    n.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidArgumentError(
                        f"layer name {short_repr(n)} is not encodable as UTF-8 (a lone surrogate)"
                    ) from None
            if len(set(names)) != len(names):
                raise InvalidArgumentError("layer_names contains duplicates")
            if len(names) > MAX_LAYERS:
                raise InvalidArgumentError(f"at most {MAX_LAYERS} layer_names, got {len(names)}")
        if num_layers is not None:
            num_layers = check_int("num_layers", num_layers, 1, MAX_LAYERS)
            if names and num_layers != len(names):
                raise InvalidArgumentError(
                    f"num_layers={num_layers} disagrees with {len(names)} layer_names"
                )
        layers = num_layers if num_layers is not None else len(names)
        timeout = 0.0
        if op_timeout is not None:
            timeout = check_seconds("op_timeout", op_timeout, MIN_OP_TIMEOUT_S)
        starvation = check_seconds("store_starvation_s", store_starvation_s, 0.0)

        self._core = _core.Core(
            int(max_inflight), layers, timeout, int(removed_memory), int(poll_backlog),
            starvation, names,
        )
        self.max_inflight = int(max_inflight)
        self.layer_names = tuple(names)
        self.op_timeout = op_timeout
        self.worker: WorkerSide = self._core.worker
        self.transfer: TransferSide = self._core.transfer

    @property
    def inherited(self) -> bool:
        """True in a process forked from the one that created this scheduler (it is unusable)."""
        return self._core.inherited

    def stats(self) -> SchedulerStats:
        """Counters and sizes (ints) and latency figures (floats, microseconds, keys ending in
        ``_us``), as a dict: a best-effort snapshot. :class:`SchedulerStats` documents each key."""
        out: dict[str, float | int] = {}
        for key, value in self._core.stats():
            out[key] = value if key.endswith("_us") else int(value)
        return cast(SchedulerStats, out)

    @property
    def closed(self) -> bool:
        return self._core.closed

    def close(self) -> None:
        """Cancel every undecided operation, wake every waiter; later calls raise
        SchedulerClosedError. Idempotent (S10)."""
        self._core.close()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kvsched.Scheduler max_inflight={self.max_inflight} closed={self.closed}>"
