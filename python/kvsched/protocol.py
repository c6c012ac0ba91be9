"""Value types of the public API: enums and scheduling requirements (contract section 3,
docs/contract.md)."""

from __future__ import annotations

import enum
import uuid as _uuid
from dataclasses import dataclass, field

__all__ = [
    "TransferKind",
    "RequestMode",
    "Decision",
    "Outcome",
    "LayerComplete",
    "LayerNameComplete",
    "IterationComplete",
    "Requirement",
    "SlotStatus",
]


class TransferKind(enum.IntEnum):
    """Direction of a transfer. LOAD onboards (host -> GPU), STORE offloads (GPU -> host)."""

    LOAD = 0
    STORE = 1


class RequestMode(enum.IntEnum):
    """SCHEDULED operations join both halves and wait for gating and a token;
    IMMEDIATE ones are already running on the transfer side."""

    SCHEDULED = 0
    IMMEDIATE = 1


class Decision(enum.IntEnum):
    EXECUTE = 1
    CANCEL = 2


class Outcome(str, enum.Enum):
    """How an operation ended (``Handle.outcome``), or OPEN while it has not.

    Each member is a ``str`` equal to its value (``Outcome.COMPLETED == "completed"``), and
    ``str()``/``format()`` give the value, so code that compared ``outcome`` with these strings
    keeps working. A dropped handle's operation ends FAILED (contract S4)."""

    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(frozen=True)
class LayerComplete:
    """Holds once layer ``layer`` (0-based) of iteration ``iteration`` is marked complete,
    iteration ``iteration`` is marked complete, or a later iteration has started (S2)."""

    layer: int
    iteration: int


@dataclass(frozen=True)
class LayerNameComplete:
    """:class:`LayerComplete` through a layer name registered with ``Scheduler(layer_names=...)``."""

    name: str
    iteration: int


@dataclass(frozen=True)
class IterationComplete:
    """Holds once iteration ``iteration`` is marked complete or a later one has started."""

    iteration: int


Requirement = (LayerComplete, LayerNameComplete, IterationComplete)  # isinstance() tuple


@dataclass(frozen=True)
class SlotStatus:
    """A snapshot of one slot's counters (contract S4, S11 in docs/contract.md).

    ``errors`` lists ``(uuid, message)`` for every failed, dropped or timed-out operation."""

    expected: int
    completed: int
    failed: int
    cancelled: int
    errors: list[tuple[_uuid.UUID, str]] = field(default_factory=list)

    @property
    def ended(self) -> int:
        return self.completed + self.failed + self.cancelled

    @property
    def is_complete(self) -> bool:
        return self.ended == self.expected
