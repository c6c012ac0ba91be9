"""``TransferEngine``: moves the blocks of decided operations and marks their handles (contract
section 4, docs/contract.md).

The scheduler decides *when* an operation may run; the engine moves its bytes. ``submit`` checks
everything first (the handle is decided EXECUTE, block ids are in range, the pools match, the
layers exist), then hands the job to a backend and returns at once; the backend marks the handle
complete when the bytes have landed, or failed with the reason.

Backends: ``"host"`` (numpy on worker threads; CPU-only machines), ``"cuda"`` (copy streams,
events and one reaper thread; see :mod:`kvsched.transfer.cuda`) and ``"nixl"`` (transfers to and
from a peer's pools through a NIXL agent; see :mod:`kvsched.transfer.nixl`). ``"auto"`` picks cuda
when cuda-python imports and a device is usable, else host, and logs why on the ``kvsched`` logger.
A cuda or nixl engine still runs host-to-host jobs, on an internal host backend.

Backpressure policy: submission never blocks. When ``max_pending`` jobs are unfinished (or, on
cuda, a copy stream's queue budget is used up), ``submit`` raises
:class:`~kvsched.transfer.errors.TransferQueueFullError` before copying anything and leaves the
handle untouched, so the engine's forward thread can retry at its next step or mark it failed.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from kvsched._args import check_int, check_seconds, short_repr
from kvsched.errors import InvalidArgumentError, KvschedError, ProtocolError, SchedulerForkedError
from kvsched.pool import BlockPool
from kvsched.protocol import Decision
from kvsched.transfer.backend import Backend
from kvsched.transfer.cudart import cuda_available
from kvsched.transfer.errors import CudaError, TransferEngineClosedError, TransferQueueFullError
from kvsched.transfer.host import HostBackend
from kvsched.transfer.job import TransferJob
from kvsched.transfer.options import CudaOptions, HostOptions, NixlOptions, as_keywords
from kvsched.transfer.plan import build_plan
from kvsched.transfer.remote import RemotePool

if TYPE_CHECKING:
    from kvsched.transfer.cuda import CudaBackend
    from kvsched.transfer.nixl import NixlBackend

__all__ = ["TransferEngine", "TransferHandle"]


class TransferHandle(Protocol):
    """What ``submit`` needs of a handle: a ``kvsched.Handle`` (or a
    ``kvsched.testing.ReferenceHandle``) decided EXECUTE."""

    @property
    def decision(self) -> Decision | None: ...

    @property
    def request_id(self) -> str: ...

    @property
    def uuid(self) -> Any: ...

    def mark_complete(self, error: BaseException | str | None = None) -> None: ...

log = logging.getLogger("kvsched")

_EXECUTE = Decision.EXECUTE

_HOST_OPTIONS = ("workers", "split_bytes", "event_timeout", "inline_bytes")

# Bumped in every forked child (os.register_at_fork): an engine made in another generation was
# inherited, and its worker threads, streams and queues are not in this process.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_CUDA_OPTIONS = ("device", "max_stream_ops", "batch", "batch_chunk", "auto_pin", "poll_interval", "sm_copy",
                 "sm_ctas", "calibration", "runtime", "driver")
# NixlOptions' poll_interval is given only through nixl=NixlOptions(...): the keyword is the cuda one.
_NIXL_OPTIONS = ("agent_name", "listen_port", "progress_thread", "transfer_timeout", "remote_timeout",
                 "max_early_notifications")


class TransferEngine:
    """Runs transfers for handles decided by a scheduler.

    ``TransferEngine(s, backend="auto", *, max_pending=1024, host=None, cuda=None,
    fault_hook=None, **options)``

    * ``s``: the :class:`kvsched.Scheduler` (or ``kvsched.testing.ReferenceScheduler``) whose
      handles are submitted; may be None. The engine needs nothing from it (each handle carries
      its operation): the argument is accepted as the contract's ``TransferEngine(s, ...)``
      says, and the ``scheduler`` attribute that kept it is deprecated (it warns, and goes in
      the next release).
    * ``backend``: ``"auto"``, ``"host"``, ``"cuda"`` or ``"nixl"``; :attr:`backend` says what
      was chosen, :attr:`backend_reason` why.
    * ``max_pending``: unfinished jobs allowed per backend before ``submit`` raises
      ``TransferQueueFullError``.
    * ``host``, ``cuda``: a :class:`~kvsched.transfer.HostOptions` /
      :class:`~kvsched.transfer.CudaOptions` with the options below as typed fields; the same as
      passing them as keyword arguments (not both for one backend).
    * host options: ``workers`` (default min(4, CPUs)), ``split_bytes`` (jobs above this are split
      by layer over the workers), ``event_timeout`` (seconds a worker waits for a host event),
      ``inline_bytes`` (jobs up to this size with no event are copied on the caller's thread;
      default 0: never).
    * cuda options: ``device`` (default: current), ``max_stream_ops`` (queued operations per copy
      stream, default 512), ``batch`` ("auto"; True or "on" to require batched copies; False or
      "off" for one cudaMemcpyAsync per copy; "driver" or "bindings" to require one way of
      batching; see :mod:`kvsched.transfer.cuda`),
      ``batch_chunk`` (most copies per batch call), ``auto_pin`` (page-lock host pools on first
      use), ``poll_interval`` ((min, max) seconds between reaper polls), ``sm_copy``, ``sm_ctas``
      and ``calibration`` (the SM copy path and the per-job path choice; docs/gpu_copies.md).
    * ``nixl``: a :class:`~kvsched.transfer.NixlOptions`; its fields but ``poll_interval`` may be
      keywords too: ``agent_name``, ``listen_port``, ``progress_thread``, ``transfer_timeout``,
      ``remote_timeout``, ``max_early_notifications`` (docs/disaggregation.md). A nixl engine
      takes remote pools (:meth:`import_pool`) in :meth:`submit` and runs local host-to-host
      jobs on an internal host backend.

    Test seams (for kvsched's own tests and fault injection; production code leaves them unset):

    * ``fault_hook(job)``: called before a job's copies; raising fails the job.
    * ``runtime`` and ``driver`` (cuda options): replace cuda-bindings' runtime and driver
      modules with stand-ins (``tests/transfer/fake_cudart.py``); with an injected ``runtime``
      the driver-level batch path is used only if ``driver`` is given too.
    """

    def __init__(
        self,
        scheduler: Any = None,
        backend: str = "auto",
        *,
        max_pending: int = 1024,
        host: HostOptions | None = None,
        cuda: CudaOptions | None = None,
        nixl: NixlOptions | None = None,
        fault_hook: Callable[[TransferJob], None] | None = None,
        **options: Any,
    ) -> None:
        unknown = set(options) - set(_HOST_OPTIONS) - set(_CUDA_OPTIONS) - set(_NIXL_OPTIONS)
        if unknown:
            raise TypeError(f"unknown TransferEngine option(s): {', '.join(sorted(unknown))}")
        nixl_options = as_keywords(nixl, NixlOptions, "nixl")
        twice = sorted(k for k in nixl_options if k in options)
        if twice:
            raise TypeError(
                f"{', '.join(twice)} given both as keyword(s) and in nixl=NixlOptions(...); give each option one way"
            )
        nixl_options.update({k: options.pop(k) for k in _NIXL_OPTIONS if k in options})
        for name, typed, kind in (("host", host, HostOptions), ("cuda", cuda, CudaOptions)):
            given = as_keywords(typed, kind, name)
            twice = sorted(k for k in given if k in options)
            if twice:
                raise TypeError(
                    f"{', '.join(twice)} given both as keyword(s) and in {name}={kind.__name__}(...); "
                    "give each option one way"
                )
            options.update(given)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, not {type(backend).__name__}")
        if backend not in ("auto", "host", "cuda", "nixl"):
            raise InvalidArgumentError(
                f"backend must be 'auto', 'host', 'cuda' or 'nixl', got {short_repr(backend)}"
            )
        if nixl_options and backend != "nixl":
            raise TypeError(f"NIXL option(s) {', '.join(sorted(nixl_options))} need backend='nixl'")
        max_pending = check_int("max_pending", max_pending, 1, 2**31 - 1)
        if fault_hook is not None and not callable(fault_hook):
            raise TypeError(f"fault_hook must be callable or None, not {type(fault_hook).__name__}")
        options = _checked_options(options)
        nixl_options = _checked_nixl_options(nixl_options)
        self._scheduler = scheduler
        self._generation = _fork_generation
        self._pid = os.getpid()
        self._host_options = {k: options[k] for k in _HOST_OPTIONS if k in options}
        self._host_options.update(max_pending=max_pending, fault_hook=fault_hook)
        cuda_options = {k: options[k] for k in _CUDA_OPTIONS if k in options}
        cuda_options.update(max_pending=max_pending, fault_hook=fault_hook)

        self._cuda: CudaBackend | None = None
        self._host: HostBackend | None = None
        self._nixl: NixlBackend | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._inflight: set[Any] = set()
        self._stats = {"submitted": 0, "completed": 0, "failed": 0, "rejected": 0, "bytes": 0, "copies": 0}

        if backend == "host":
            self.backend, self.backend_reason = "host", "requested"
        elif backend == "nixl":
            from kvsched.transfer.nixl import NixlBackend  # imports NIXL, with an install hint if absent

            self._nixl = NixlBackend(max_pending=max_pending, fault_hook=fault_hook, **nixl_options)
            self.backend, self.backend_reason = "nixl", f"requested (agent {self._nixl.agent_name!r})"
        else:
            usable, reason = cuda_available(options.get("runtime"))
            if usable:
                from kvsched.transfer.cuda import CudaBackend  # imports nothing CUDA by itself

                self._cuda = CudaBackend(**cuda_options)
                self.backend, self.backend_reason = "cuda", reason
            elif backend == "cuda":
                raise CudaError(f"backend='cuda' but no usable CUDA device: {reason}")
            else:
                self.backend, self.backend_reason = "host", f"no usable CUDA device: {reason}"
        if self.backend == "host":
            self._host = HostBackend(**self._host_options)
        log.info("kvsched: TransferEngine backend=%s (%s)", self.backend, self.backend_reason)
        self._backends: list[Backend] = [b for b in (self._nixl, self._cuda, self._host) if b is not None]
        self._finalizer = weakref.finalize(self, _abandon, self._backends, self._generation)

    @property
    def scheduler(self) -> Any:
        """Deprecated: the scheduler given to the constructor, which the engine never uses. Goes
        in the next release; keep your own reference to the scheduler."""
        warnings.warn(
            "TransferEngine.scheduler is deprecated and will be removed: the engine does not use "
            "the scheduler; keep your own reference to it",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._scheduler

    # ------------------------------------------------------------------------------ submit

    def submit(
        self,
        h: TransferHandle,
        src: BlockPool,
        dst: BlockPool,
        pairs: Any,
        layers: Sequence[int] | None = None,
        *,
        compute_event: Any = None,
        wait_event: Any = None,
    ) -> TransferJob:
        """Copy ``pairs`` ((N, 2) block ids: source block, destination block) of ``layers`` (None:
        all) from pool ``src`` to pool ``dst``, then mark ``h``.

        Never blocks on the copy. Raises before anything is copied when ``h`` is not decided
        EXECUTE (``ProtocolError``), on bad ids, mismatched pools or layers out of range
        (``InvalidArgumentError``, a ``ValueError``; ``TypeError`` for wrong types), or when the
        engine is full (``TransferQueueFullError``) or closed. ``pairs``: an integer array (N, 2),
        or a list of (src, dst) pairs. On the cuda backend,
        ``compute_event`` / ``wait_event`` (a CUDA event or a list of them) are waited on by the
        copy stream before it copies: pass the compute stream's event recorded after the layer
        wrote the blocks (store) or after its last read of blocks being reused (load). Returns the
        :class:`TransferJob`; ``job.wait_on(stream)`` makes a stream wait for a load."""
        # The handle's request id and uuid are read only for an error message: making a
        # uuid.UUID object is a measurable part of a submit when the caches are cold (an
        # engine's forward thread between layers).
        if self._generation != _fork_generation:
            self._raise_forked("submit")
        if self._closed:
            raise TransferEngineClosedError(f"submit of {_op_name(h)} after close()")
        if not callable(getattr(h, "mark_complete", None)):
            raise TypeError(f"h must be a scheduler handle with mark_complete(), got {type(h).__name__}")
        decision = h.decision
        if decision is not _EXECUTE and decision != _EXECUTE:
            state = "undecided" if decision is None else f"decided {getattr(decision, 'name', decision)}"
            raise ProtocolError(f"{_op_name(h)}: only an EXECUTE handle can be submitted, this one is {state}")
        try:
            plan = build_plan(src, dst, pairs, layers)
            _check_writable(dst)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{_op_name(h)}: {exc}") from None
        except TypeError as exc:
            raise TypeError(f"{_op_name(h)}: {exc}") from None
        kind = plan.kind
        if isinstance(plan.src, RemotePool) or isinstance(plan.dst, RemotePool):
            if self._nixl is None:
                raise InvalidArgumentError(
                    f"{_op_name(h)}: a remote pool needs backend='nixl' (this engine is {self.backend})"
                )
            backend: Any = self._nixl
        elif kind == "h2h" and self._host is not None:
            backend = self._host
        else:
            backend = self._backend_for(kind, h)

        claim = getattr(h, "_claim_transfer", None)
        # A scheduler handle is claimed in the core (one atomic step, below): it is its own key
        # in the in-flight set. Any other handle is keyed by its uuid, the duplicate check.
        key: Any = h if claim is not None else _uuid_key(h)
        inflight, stats = self._inflight, self._stats
        with self._lock:  # counted as submitted now, taken back if the backend refuses it
            if key in inflight:
                raise ProtocolError(f"{_op_name(h)} is already being transferred")
            # The handle's operation must still be open and copied by no one else: a handle that
            # ended (its job completed, or the caller marked it) or that another engine copies
            # would write blocks that may belong to another request by now. The claim is one
            # atomic step in the core; handles without it (stand-ins) are checked by outcome.
            if claim is not None:
                claim()
            elif getattr(h, "outcome", "open") not in ("open", None):
                raise ProtocolError(f"{_op_name(h)} has ended ({h.outcome}); nothing copied")
            inflight.add(key)
            stats["submitted"] += 1
        job = TransferJob(h, plan, kind)
        job._add_callback(lambda j, key=key: self._on_finished(j, key))
        if plan.num_blocks == 0 or plan.num_layers == 0:
            job._finish(None)  # nothing to move
            return job
        try:
            backend.submit(job, compute_event=compute_event, wait_event=wait_event)
        except BaseException as exc:
            with self._lock:
                inflight.discard(key)
                stats["submitted"] -= 1
                if isinstance(exc, TransferQueueFullError):
                    stats["rejected"] += 1
            release = getattr(h, "_release_transfer_claim", None)
            if release is not None:
                release()  # nothing was copied: the handle is the caller's again
            raise
        return job

    def _backend_for(self, kind: str, h: Any) -> Any:
        if kind == "h2h":
            if self._host is None:
                with self._lock:
                    if self._host is None:
                        self._host = HostBackend(**self._host_options)
                        self._backends.append(self._host)
            return self._host
        if self._cuda is None:
            raise InvalidArgumentError(
                f"{_op_name(h)}: a {kind} copy needs backend='cuda' (this engine is {self.backend})"
            )
        return self._cuda

    def _on_finished(self, job: TransferJob, key: Any) -> None:
        with self._lock:
            self._inflight.discard(key)
            if job.error is None:
                self._stats["completed"] += 1
                self._stats["bytes"] += job.nbytes
                self._stats["copies"] += job.num_copies
            else:
                self._stats["failed"] += 1

    # ------------------------------------------------------------------------------ peers (nixl)

    def _nixl_backend(self, what: str) -> NixlBackend:
        if self._generation != _fork_generation:
            self._raise_forked(what)
        if self._closed:
            raise TransferEngineClosedError(f"{what} after close()")
        if self._nixl is None:
            raise KvschedError(f"{what} needs backend='nixl' (this engine is {self.backend})")
        return self._nixl

    @property
    def agent_name(self) -> str:
        """This engine's NIXL agent name (nixl backend)."""
        return self._nixl_backend("agent_name").agent_name

    def export_pool(self, pool: BlockPool, *, with_metadata: bool = True) -> bytes:
        """Register local ``pool`` with this engine's NIXL agent and describe it for a peer: bytes
        to ship over the serving engine's own channel, turned into a remote pool there by
        :meth:`import_pool`. With ``with_metadata`` (default) the bytes also carry this agent's
        metadata, so one message is all a peer needs."""
        return self._nixl_backend("export_pool").export_pool(pool, with_metadata=with_metadata)

    def import_pool(self, description: bytes) -> RemotePool:
        """A peer's pool from its :meth:`export_pool` bytes (parsed as untrusted input: anything
        malformed raises ``InvalidArgumentError``). Use it as ``src`` (a NIXL READ) or ``dst`` (a
        WRITE) of :meth:`submit`; block ids are bounds-checked against it before any transfer."""
        return self._nixl_backend("import_pool").import_pool(description)

    def metadata(self) -> bytes:
        """This agent's NIXL metadata, for a peer's :meth:`add_peer`."""
        return self._nixl_backend("metadata").metadata()

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's agent metadata (from its :meth:`metadata`); returns the peer's name."""
        return self._nixl_backend("add_peer").add_peer(metadata)

    def connect(self, peer: str, host: str, port: int, *, timeout: float = 10.0) -> None:
        """Exchange metadata with ``peer`` through its NIXL listener at ``host:port``; both sides
        then know each other. Both engines need ``listen_port`` (NIXL's listener thread carries
        both directions). For simple setups: pools then travel as notifications
        (:meth:`send_pool` / :meth:`receive_pool`)."""
        if not isinstance(peer, str) or not isinstance(host, str):
            raise TypeError("peer and host must be str")
        port = check_int("port", port, 1, 65535)
        timeout = check_seconds("timeout", timeout, 0.0)
        self._nixl_backend("connect").connect(peer, host, port, timeout)

    def send_pool(self, peer: str, pool: BlockPool, *, timeout: float = 10.0) -> None:
        """Send ``pool``'s description to a connected ``peer`` (it calls :meth:`receive_pool`);
        waits up to ``timeout`` for the peer's metadata to arrive through the listener."""
        timeout = check_seconds("timeout", timeout, 0.0)
        self._nixl_backend("send_pool").send_pool(peer, pool, timeout)

    def receive_pool(self, peer: str, *, timeout: float = 10.0) -> RemotePool:
        """The next pool ``peer`` sent with :meth:`send_pool`, imported; waits up to ``timeout``."""
        timeout = check_seconds("timeout", timeout, 0.0)
        return self._nixl_backend("receive_pool").receive_pool(peer, timeout)

    def forget_peer(self, peer: str) -> None:
        """Drop a peer's metadata (NIXL disconnects); its remote pools can no longer be used."""
        self._nixl_backend("forget_peer").forget_peer(peer)

    def expect_remote(self, h: TransferHandle, *, peer: str | None = None,
                      timeout: float | None = None) -> TransferJob:
        """The other side of a peer's transfer: mark ``h`` (decided EXECUTE, with the same uuid as
        the peer's operation) complete when the peer's notification says its transfer into or out
        of this side's blocks ended, failed when it says it failed, and failed after ``timeout``
        seconds (default: the engine's ``remote_timeout``) with no word, so a peer that died
        never leaves the operation open. ``peer``: accept the notification only from that agent.
        While expected, the handle is the engine's (the caller's ``mark_complete`` raises), as
        for :meth:`submit`. Returns a :class:`TransferJob` (kind ``"remote"``, no bytes of its own)."""
        nixl = self._nixl_backend("expect_remote")
        rid, uid = getattr(h, "request_id", None), getattr(h, "uuid", None)
        if peer is not None and not isinstance(peer, str):
            raise TypeError(f"peer must be a str or None, not {type(peer).__name__}")
        wait_s = nixl.remote_timeout if timeout is None else check_seconds("timeout", timeout, 0.0)
        if not callable(getattr(h, "mark_complete", None)):
            raise TypeError(f"h must be a scheduler handle with mark_complete(), got {type(h).__name__}")
        decision = h.decision
        if decision is not _EXECUTE and decision != _EXECUTE:
            state = "undecided" if decision is None else f"decided {getattr(decision, 'name', decision)}"
            raise ProtocolError(
                f"request {rid!r} op {uid}: only an EXECUTE handle can be expected, this one is {state}"
            )
        key: Any = h if getattr(h, "_claim_transfer", None) is not None else _uuid_key(h)
        with self._lock:
            if key in self._inflight:
                raise ProtocolError(f"request {rid!r} op {uid} is already being transferred or expected")
            claim = getattr(h, "_claim_transfer", None)
            if claim is not None:
                claim()
            elif getattr(h, "outcome", "open") not in ("open", None):
                raise ProtocolError(f"request {rid!r} op {uid} has ended ({h.outcome})")
            self._inflight.add(key)
            self._stats["submitted"] += 1
        from kvsched.transfer.nixl import REMOTE_PLAN

        job = TransferJob(h, REMOTE_PLAN, "remote")
        job._add_callback(lambda j, key=key: self._on_finished(j, key))
        try:
            nixl.expect(job, peer, wait_s)
        except BaseException:
            with self._lock:
                self._inflight.discard(key)
                self._stats["submitted"] -= 1
            release = getattr(h, "_release_transfer_claim", None)
            if release is not None:
                release()
            raise
        return job

    def cancel_remote(self, peer: str | RemotePool, uuid: Any, reason: str = "cancelled") -> None:
        """Tell ``peer`` (an agent name, or a pool of it) that its operation ``uuid`` will not
        happen here: a transfer this side was to make was cancelled or refused before it was
        posted, so the peer's :meth:`expect_remote` for it fails at once instead of after its
        timeout (and the peer frees the blocks it kept). Best effort: a peer that is gone hears
        nothing, and its expectation times out as before."""
        if isinstance(peer, RemotePool):
            peer = peer.peer
        if not isinstance(peer, str):
            raise TypeError(f"peer must be a str or a RemotePool, not {type(peer).__name__}")
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a str, not {type(reason).__name__}")
        self._nixl_backend("cancel_remote").cancel_remote(peer, uuid, reason)

    # ------------------------------------------------------------------------------ state

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished."""
        if self._generation != _fork_generation:
            self._raise_forked("pending")
        return sum(b.pending for b in (self._nixl, self._cuda, self._host) if b is not None)

    def stream(self, kind: str) -> int:
        """Raw handle of the cuda backend's copy stream for ``kind`` ("h2d", "d2h", "d2d")."""
        if self._cuda is None:
            raise KvschedError("the host backend has no CUDA streams")
        return self._cuda.stream(kind)

    @property
    def batched(self) -> bool:
        """True when the cuda backend submits copies with cudaMemcpyBatchAsync."""
        return bool(self._cuda is not None and self._cuda.batch_enabled)

    def stats(self) -> dict[str, Any]:
        if self._generation != _fork_generation:
            self._raise_forked("stats")
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
        out["pending"] = self.pending
        out["backend"] = self.backend
        if self._cuda is not None:
            out["batched"] = self._cuda.batch_enabled
            out["batch_mode"] = self._cuda.batch_mode
            out["batch_reason"] = self._cuda.batch_reason
        if self._nixl is not None:
            out["nixl"] = self._nixl.stats()
        return out

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job finished (tests, tools, shutdown). False on timeout."""
        if self._generation != _fork_generation:
            self._raise_forked("wait_idle")
        ok = True
        for b in (self._nixl, self._cuda, self._host):
            if b is not None:
                ok = b.wait_idle(timeout) and ok
        return ok

    def _raise_forked(self, what: str) -> None:
        raise SchedulerForkedError(
            f"{what}: this TransferEngine was created in process {self._pid} and inherited by "
            f"fork() into process {os.getpid()}; its threads and queues stay in the parent. "
            f"Create a new TransferEngine (and Scheduler) in the child"
        )

    @property
    def inherited(self) -> bool:
        """True in a process forked from the one that created this engine (it is unusable)."""
        return self._generation != _fork_generation

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, wait for in-flight copies to land (their handles get marked), release
        threads, streams and events. Idempotent. False if ``timeout`` expired first. In a forked
        child, closing an inherited engine does nothing and returns at once (its threads are in
        the parent)."""
        self._closed = True
        if self._generation != _fork_generation:
            self._finalizer.detach()
            return True
        ok = True
        for b in (self._nixl, self._cuda, self._host):
            if b is not None:
                ok = b.close(timeout) and ok
        if ok:
            self._finalizer.detach()
        return ok

    def __enter__(self) -> "TransferEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._generation != _fork_generation:
            return f"TransferEngine(backend={self.backend!r}, inherited by fork: unusable)"
        return f"TransferEngine(backend={self.backend!r}, pending={self.pending}, closed={self._closed})"


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """Integer and duration options range-checked here, before any thread or stream is made (a
    ``workers=2**63`` would otherwise start threads until memory runs out)."""
    out = dict(options)
    ints = {"workers": (1, 1024), "split_bytes": (0, 2**62), "inline_bytes": (0, 2**62),
            "max_stream_ops": (1, 2**31 - 1),
            "batch_chunk": (1, 2**31 - 1), "device": (0, 2**31 - 1)}
    for name, (lo, hi) in ints.items():
        if name not in out or (out[name] is None and name in ("workers", "device")):
            continue  # absent, or None: the documented default
        out[name] = check_int(name, out[name], lo, hi)
    if "event_timeout" in out:
        out["event_timeout"] = check_seconds("event_timeout", out["event_timeout"], 0.0)
    if "auto_pin" in out and not isinstance(out["auto_pin"], bool):
        raise TypeError(f"auto_pin must be a bool, not {type(out['auto_pin']).__name__}")
    if "poll_interval" in out:
        pi = out["poll_interval"]
        if not isinstance(pi, (tuple, list)) or len(pi) != 2:
            raise TypeError("poll_interval must be a (min, max) pair of seconds")
        lo_s = check_seconds("poll_interval[0]", pi[0], 1e-9)
        hi_s = check_seconds("poll_interval[1]", pi[1], lo_s)
        out["poll_interval"] = (lo_s, hi_s)
    return out


def _checked_nixl_options(options: dict[str, Any]) -> dict[str, Any]:
    out = dict(options)
    name = out.get("agent_name")
    if name is not None:
        if not isinstance(name, str) or not name or len(name) > 200 or any(ord(c) < 32 for c in name):
            raise InvalidArgumentError(f"agent_name must be a non-empty printable str, got {short_repr(name)}")
    if "progress_thread" in out and not isinstance(out["progress_thread"], bool):
        raise TypeError(f"progress_thread must be a bool, not {type(out['progress_thread']).__name__}")
    if out.get("listen_port") is not None:
        out["listen_port"] = check_int("listen_port", out["listen_port"], 1, 65535)
    for key in ("transfer_timeout", "remote_timeout"):
        if key in out:
            out[key] = check_seconds(key, out[key], 1e-6)
    if "max_early_notifications" in out:
        out["max_early_notifications"] = check_int("max_early_notifications", out["max_early_notifications"], 0, 1 << 24)
    if "poll_interval" in out:
        pi = out["poll_interval"]
        if not isinstance(pi, (tuple, list)) or len(pi) != 2:
            raise TypeError("poll_interval must be a (min, max) pair of seconds")
        lo_s = check_seconds("poll_interval[0]", pi[0], 1e-9)
        out["poll_interval"] = (lo_s, check_seconds("poll_interval[1]", pi[1], lo_s))
    return out


def _check_writable(dst: Any) -> None:
    """The destination's arrays must be writable now, not only when the pool was built: numpy
    lets a caller set ``arr.flags.writeable = False`` at any time."""
    if dst.readonly:
        raise InvalidArgumentError("the destination pool is read-only")
    for owner in dst._owners:
        flags = getattr(owner, "flags", None)
        if flags is not None and getattr(flags, "writeable", True) is False:
            raise InvalidArgumentError(
                "the destination pool's array was made read-only after the pool was built"
            )


def _abandon(backends: list[Backend], generation: int) -> None:
    if generation != _fork_generation:
        return  # a forked child's copy: the threads and streams are the parent's
    for b in backends:
        try:
            b.abandon()
        except Exception:  # noqa: BLE001 - garbage collection path
            pass


def _op_name(h: Any) -> str:
    """``request 'r' op <uuid>``: how error messages name a handle's operation."""
    return f"request {getattr(h, 'request_id', None)!r} op {getattr(h, 'uuid', None)}"


def _uuid_key(h: Any) -> Any:
    """The in-flight key of a handle the core does not claim (a stand-in): its uuid, else itself."""
    uid = getattr(h, "uuid", None)
    return uid if uid is not None else id(h)
