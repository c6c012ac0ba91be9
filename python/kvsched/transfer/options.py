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

__all__ = ["HostOptions", "CudaOptions", "NixlOptions"]


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
    #: the SM copy kernel for loads and stores (docs/gpu_copies.md): False or "off" never; "auto"
    #: loaded and self-tested at start-up, used where ``calibration`` measured it faster, else the
    #: copy engine; True or "on": as "auto" but raise if it is unusable; "force": every load and
    #: store (benchmarks, tests). Off until measured on hardware (bench/RESULTS.md).
    sm_copy: bool | str = False
    #: CTAs of one SM copy launch: few, so copies do not take the compute kernels' SMs
    sm_ctas: int = 12
    #: the measured choice of path and DMA settings per (direction, block size, copies): None for
    #: the built-in one (the copy engine, with the settings used before any measurement), a
    #: ``kvsched.transfer.copy_path.Calibration``, its dict form, or the path of the JSON file
    #: written by ``bench/cuda_calibrate.py``
    calibration: Any = None


@dataclass(frozen=True)
class NixlOptions:
    """Options of the nixl backend (one NIXL agent, UCX; see kvsched.transfer.nixl)."""

    #: the NIXL agent's name, unique among the peers; None: ``kvsched-<pid>-<random>``
    agent_name: str | None = None
    #: start NIXL's listener thread on this port (for ``connect``); None: no listener
    listen_port: int | None = None
    #: run NIXL's progress thread, which spins a core even when idle (docs/disaggregation.md
    #: "CPU"); False: the engine's completion thread progresses UCX when it polls
    progress_thread: bool = False
    #: seconds a transfer may stay in progress before it is cancelled and failed
    transfer_timeout: float = 60.0
    #: seconds ``expect_remote`` waits for the peer's notification before failing the operation
    remote_timeout: float = 60.0
    #: notifications kept that arrived before their ``expect_remote`` (oldest dropped first)
    max_early_notifications: int = 4096
    #: (min, max) seconds between the completion thread's polls while work is in flight
    poll_interval: tuple[float, float] = (20e-6, 2e-3)


def as_keywords(options: Any, kind: type, name: str) -> dict[str, Any]:
    """The fields of ``options`` (a ``kind`` or None) as keyword options."""
    if options is None:
        return {}
    if not isinstance(options, kind):
        raise TypeError(f"{name} must be a {kind.__name__} or None, not {type(options).__name__}")
    return {f.name: getattr(options, f.name) for f in fields(options)}
