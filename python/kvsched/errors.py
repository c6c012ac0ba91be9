"""The exceptions of kvsched, defined once.

The C++ core reports a status code; the binding layer maps each code to one of these classes
(``csrc/bindings/module.cpp``), so Python and C++ never disagree on names. Every message names
the request id and the uuid involved (contract S8, docs/contract.md).
"""

from __future__ import annotations

__all__ = [
    "KvschedError",
    "SlotExistsError",
    "UnknownSlotError",
    "SlotBusyError",
    "DuplicateOperationError",
    "ProtocolError",
    "HandleDroppedError",
    "SchedulerClosedError",
    "SchedulerForkedError",
    "InvalidArgumentError",
]


class KvschedError(Exception):
    """Base class of every error kvsched raises on misuse."""


class SlotExistsError(KvschedError):
    """``create_slot`` for a request id whose slot already exists."""


class UnknownSlotError(KvschedError):
    """The request id has no slot (never created, or already removed)."""


class SlotBusyError(KvschedError):
    """``remove_slot`` while some operation of the slot has not ended."""


class DuplicateOperationError(KvschedError):
    """The same uuid arrived twice on one side (worker or transfer)."""


class ProtocolError(KvschedError):
    """A call out of protocol: halves that disagree, a second mark, a skipped layer..."""


class HandleDroppedError(KvschedError):
    """A decided handle was garbage-collected without ``mark_complete``.

    Never raised at the caller: recorded as the failure of the operation (contract S4,
    docs/contract.md)."""


class SchedulerClosedError(KvschedError):
    """The scheduler was closed; no further calls are accepted."""


class SchedulerForkedError(SchedulerClosedError):
    """The object was created in another process and inherited by ``fork()``.

    A forked child gets a copy of the parent's memory but none of its threads: an inherited
    scheduler or transfer engine would hang on locks held by threads that are not there, or
    move bytes the parent also moves. Every call on it raises this error (``close()`` is a
    no-op); create new ones in the child. A :class:`SchedulerClosedError`, so code that handles
    a closed scheduler handles this too."""


class InvalidArgumentError(KvschedError, ValueError):
    """A value out of range (negative layer, unknown layer name, malformed uuid...).

    It is both a :class:`KvschedError` and a :class:`ValueError`, so callers may catch either."""
