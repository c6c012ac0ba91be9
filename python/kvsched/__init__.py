"""kvsched: a KV-cache transfer scheduler for LLM serving engines.

Import never needs a GPU, a driver or cuda-python (contract section 4, docs/contract.md).
"""

from __future__ import annotations

from .errors import (
    DuplicateOperationError,
    HandleDroppedError,
    InvalidArgumentError,
    KvschedError,
    ProtocolError,
    SchedulerClosedError,
    SchedulerForkedError,
    SlotBusyError,
    SlotExistsError,
    UnknownSlotError,
)
from .protocol import (
    Decision,
    IterationComplete,
    LayerComplete,
    LayerNameComplete,
    Outcome,
    RequestMode,
    SlotStatus,
    TransferKind,
)
from .scheduler import Handle, Scheduler, SchedulerStats, TransferSide, WorkerSide

__version__ = "0.1.0"

__all__ = [
    "Scheduler", "SchedulerStats", "Handle", "WorkerSide", "TransferSide",
    "TransferKind", "RequestMode", "Decision", "Outcome", "SlotStatus",
    "LayerComplete", "LayerNameComplete", "IterationComplete",
    "KvschedError", "SlotExistsError", "UnknownSlotError", "SlotBusyError",
    "DuplicateOperationError", "ProtocolError", "HandleDroppedError", "SchedulerClosedError",
    "SchedulerForkedError", "InvalidArgumentError",
    "BlockPool", "TransferEngine", "HostOptions", "CudaOptions", "NixlOptions", "RemotePool",
]


def __getattr__(name: str):
    # Transfer classes load lazily so `import kvsched` stays light (no numpy import cost for
    # scheduler-only users).
    if name == "BlockPool":
        from .pool import BlockPool

        return BlockPool
    if name in ("TransferEngine", "HostOptions", "CudaOptions", "NixlOptions", "RemotePool"):
        from . import transfer

        return getattr(transfer, name)
    raise AttributeError(f"module 'kvsched' has no attribute {name!r}")
