"""What the scheduler side sends to the workers each step, and what they send back.

Plain, picklable value types: an engine ships a :class:`StepPlan` to every worker process with
its per-step metadata and returns :class:`OpReports` with the step's output.

Operation ids are 128-bit uuids whose low 16 bits are zero: a worker that splits an operation
by layer names layer k's part ``base + k`` (:func:`layer_uuid`), so both sides derive the same
ids without sending one per layer.
"""

from __future__ import annotations

import uuid as _uuid
from dataclasses import dataclass, field

__all__ = ["LoadSpec", "StoreSpec", "SendSpec", "RecvSpec", "StepPlan", "OpReports", "new_op_id", "layer_uuid"]

_LAYER_BITS = 16
_LAYER_MASK = (1 << _LAYER_BITS) - 1


def new_op_id() -> int:
    """A fresh operation id (an int: a uuid4 with its low 16 bits cleared)."""
    return _uuid.uuid4().int & ~_LAYER_MASK


def layer_uuid(op_id: int, layer: int) -> _uuid.UUID:
    """The kvsched uuid of layer ``layer``'s part of operation ``op_id`` (layer 0 for a
    whole-operation transfer)."""
    return _uuid.UUID(int=op_id | layer)


@dataclass
class LoadSpec:
    """Copy host slots ``host_blocks[i]`` into GPU blocks ``gpu_blocks[i]`` (every layer).

    ``layerwise``: the worker runs one operation per layer during the forward pass and layer k
    waits for its own part; else one operation for all layers, reported when it ends
    (the request waits for it before it is scheduled)."""

    op_id: int
    req_id: str
    gpu_blocks: list[int]
    host_blocks: list[int]
    layerwise: bool = False


@dataclass
class StoreSpec:
    """Copy GPU blocks ``gpu_blocks[i]`` into host slots ``host_blocks[i]``, layer k gated on
    layer k of the step that carries this spec (the blocks became full in that step)."""

    op_id: int
    req_id: str
    gpu_blocks: list[int]
    host_blocks: list[int]


@dataclass
class SendSpec:
    """Disaggregated serving, producer side: a peer (the decode instance) will read GPU blocks
    ``gpu_blocks`` of the finished request ``req_id``. The worker keeps them until the peer's
    notification for operation ``op_id`` says the read ended (or the wait timed out)."""

    op_id: int
    req_id: str
    gpu_blocks: list[int]


@dataclass
class RecvSpec:
    """Disaggregated serving, consumer side: read the producer's GPU blocks ``remote_blocks[i]``
    into this instance's GPU blocks ``gpu_blocks[i]`` (every layer), with operation ``op_id``
    (the same uuid as the producer's :class:`SendSpec`, so its notification ends the producer's
    operation). ``pools``: the producer's exported pool per rank (``TransferEngine.export_pool``
    bytes, agent metadata included); worker rank r reads from ``pools[r]``.

    ``cancel``: the request ended (aborted) before its read was planned: read nothing, tell the
    producer the read will not happen so it frees the blocks it kept."""

    op_id: int
    req_id: str
    gpu_blocks: list[int]
    remote_blocks: list[int]
    pools: list[bytes]
    cancel: bool = False


@dataclass
class StepPlan:
    """One engine step's transfers, in the order the scheduler decided them.

    * ``loads`` / ``stores``: new operations.
    * ``preempted``: requests whose GPU blocks the engine freed this step: cancel their
      undecided operations and fence the running ones before the blocks are reused.
    * ``aborted``: finished requests whose pending operations should be cancelled.
    * ``release``: finished requests the engine keeps blocks for until the worker reports
      them (vLLM's ``finished_sending``), once every operation of theirs has ended.
    * ``sends`` / ``recvs``: disaggregated serving (a peer reads a finished request's blocks;
      this instance reads a peer's).
    * ``host_blocks``: the tier's capacity in blocks (the workers check their host pools)."""

    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    sends: list[SendSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    host_blocks: int = 0

    def __bool__(self) -> bool:
        return bool(self.loads or self.stores or self.preempted or self.aborted or self.release
                    or self.sends or self.recvs)


@dataclass
class OpReports:
    """Outcomes of operations that ended on a worker: ``op_id -> [reports, failures]``.

    Each worker reports ``[1, 0]`` (ok) or ``[1, 1]`` (failed, cancelled or timed out) per
    operation; :meth:`aggregate` adds the reports of several workers (vLLM aggregates worker
    metadata of one step this way), and the scheduler side counts an operation ended when
    every worker reported it."""

    ops: dict[int, list[int]] = field(default_factory=dict)

    def add(self, op_id: int, ok: bool) -> None:
        r = self.ops.setdefault(op_id, [0, 0])
        r[0] += 1
        r[1] += 0 if ok else 1

    def aggregate(self, other: "OpReports") -> "OpReports":
        for op_id, (n, failed) in other.ops.items():
            r = self.ops.setdefault(op_id, [0, 0])
            r[0] += n
            r[1] += failed
        return self

    def __bool__(self) -> bool:
        return bool(self.ops)
