"""Typed options of ``TransferEngine``: ``TransferEngine(s, host=HostOptions(...),
cuda=CudaOptions(...))`` is the same as passing each field as a keyword argument (which keeps
working). Give each option one way: an options object together with a keyword option of the same
backend raises ``TypeError``. Values are checked by the engine, as keyword arguments are.

The test seams (``fault_hook``, and the cuda backend's ``runtime`` and ``driver`` stand-ins) are
not here: they stay keyword arguments of ``TransferEngine``, documented there as test seams.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["HostOptions", "CudaOptions"]


@dataclass(frozen=True)
class HostOptions:
    """Options of the host backend (numpy copies on worker threads)."""

    #: worker threads; None: ``min(4, os.cpu_count())``
    workers: int | None = None
    #: jobs above this many bytes are split by layer over the workers
    split_bytes: int = 8 << 20
    #: seconds a worker waits for a host event given as ``compute_event``/``wait_event``
    event_timeout: float = 60.0
    #: jobs of at most this many bytes with no event to wait for are copied on the submitting
    #: thread (cheaper than waking a copy thread); 0: never
    inline_bytes: int = 0


@dataclass(frozen=True)
class CudaOptions:
    """Options of the cuda backend (copy streams, events and one reaper thread)."""

    #: CUDA device index; None: the current device
    device: int | None = None
    #: operations queued per copy stream before ``submit`` raises ``TransferQueueFullError``
    max_stream_ops: int = 512
    #: "auto"; True or "on" to require batched copies; False or "off" for one cudaMemcpyAsync per
    #: copy; "driver" or "bindings" to require one way of batching (see kvsched.transfer.cuda)
    batch: bool | str = "auto"
    #: most copies per batch call
    batch_chunk: int = 4096
    #: page-lock host pools on first use
    auto_pin: bool = True
    #: (min, max) seconds between the reaper's polls of in-flight events
    poll_interval: tuple[float, float] = (20e-6, 500e-6)


def as_keywords(options: Any, kind: type, name: str) -> dict[str, Any]:
    """The fields of ``options`` (a ``kind`` or None) as keyword options."""
    if options is None:
        return {}
    if not isinstance(options, kind):
        raise TypeError(f"{name} must be a {kind.__name__} or None, not {type(options).__name__}")
    return {f.name: getattr(options, f.name) for f in fields(options)}
