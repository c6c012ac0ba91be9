"""NIXL backend: moves blocks between this process's pools and a peer's, through a NIXL agent.

One :class:`NixlBackend` per ``TransferEngine(backend="nixl")``: one NIXL agent (UCX), the local
pools registered with it, the peers whose pools were imported, and one completion thread.

* ``submit`` of a job whose destination is a :class:`~kvsched.transfer.remote.RemotePool` posts
  a NIXL WRITE; whose source is one, a READ. The job's copies (one descriptor per layer, piece
  and run of consecutive blocks, as for local pools) were bounds-checked by the engine first.
  Posting happens on the submitting thread; it never waits for the bytes.
* The completion thread polls every transfer in flight (``check_xfer_state``) and the agent's
  notifications, with a backoff between ``poll_interval`` bounds; there is no thread per job. A
  transfer that ends DONE marks its handle complete; one that ends in error (the peer went away,
  a transport error) marks it failed with NIXL's reason; one still in progress after
  ``transfer_timeout`` is cancelled (``release_xfer_handle``) and failed, and only once NIXL
  confirms the cancel: a transfer that may still land is never reported ended.
* **The other side of a transfer.** Every transfer carries a notification, ``kvsched1 <uuid> ok
  <bytes>``, which NIXL delivers to the peer after the data (for a READ: after it was read). The
  peer's engine completes its own operation with the same uuid (``expect_remote``), so the side
  whose blocks were written or read knows when it may reuse them. A transfer that fails sends
  ``kvsched1 <uuid> err <reason>`` (best effort: the peer may be gone). A notification that comes
  before its ``expect_remote`` waits (bounded, see ``max_early_notifications``); an expectation
  with no notification within its timeout fails, so a dead initiator never leaves an operation
  open. A uuid that already ended ignores later notifications: nothing is counted twice.

NIXL calls are serialized by one lock (the agent is made with NIXL's default thread mode, in which
it does not lock itself). Facts about NIXL used here: ``../docs/disaggregation.md``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid as uuid_module
from collections import OrderedDict, deque
from typing import Any, Callable

import numpy as np

from kvsched.errors import InvalidArgumentError, ProtocolError
from kvsched.pool import BlockPool
from kvsched.transfer.backend import event_list
from kvsched.transfer.errors import TransferEngineClosedError, TransferError, TransferQueueFullError
from kvsched.transfer.job import TransferJob
from kvsched.transfer.plan import LIST_SEGMENTS
from kvsched.transfer.remote import RemotePool, decode_pool, encode_pool

__all__ = ["NixlBackend", "load_nixl", "NOTIFY_PREFIX", "REMOTE_PLAN"]

log = logging.getLogger("kvsched")

#: Every notification kvsched sends starts with this (then the uuid's 32 hex digits).
NOTIFY_PREFIX = b"kvsched1 "
_POOL_PREFIX = b"kvsched1-pool "
_MAX_REASON = 1024
_RECENT_UUIDS = 1 << 14  # ended uuids remembered, so a late or repeated notification is ignored


def load_nixl() -> Any:
    """Import NIXL's Python API, or raise ImportError saying how to install it."""
    try:
        from nixl import _api  # noqa: PLC0415 - optional dependency, loaded on first use
    except ImportError as exc:
        raise ImportError(
            "backend='nixl' needs NIXL's Python package: pip install 'kvsched[nixl]' "
            "(on a machine without CUDA, install the CPU torch first or see docs/disaggregation.md "
            f"for the lean install); import failed: {exc}"
        ) from exc
    return _api


class _RemotePlan:
    """The plan of an ``expect_remote`` job: the bytes move on the peer's side, none here."""

    kind = "remote"
    nbytes = 0
    num_copies = 0
    num_blocks = 0


REMOTE_PLAN: Any = _RemotePlan()


class _Xfer:
    """A posted NIXL transfer: the job, NIXL's handle, when it was posted, the peer."""

    __slots__ = ("job", "handle", "posted_at", "peer", "cancelling")

    def __init__(self, job: TransferJob, handle: Any, peer: str) -> None:
        self.job, self.handle, self.peer = job, handle, peer
        self.posted_at = time.monotonic()
        self.cancelling = False


class _Deferred:
    """A job whose events (``compute_event`` / ``wait_event``) are not all set yet."""

    __slots__ = ("job", "waits", "since", "post")

    def __init__(self, job: TransferJob, waits: list[Any], post: Callable[[], Any]) -> None:
        self.job, self.waits, self.post = job, waits, post
        self.since = time.monotonic()


class _Expectation:
    __slots__ = ("job", "peer", "deadline")

    def __init__(self, job: TransferJob, peer: str | None, deadline: float) -> None:
        self.job, self.peer, self.deadline = job, peer, deadline


class NixlBackend:
    """See the module docstring. Thread-safe."""

    name = "nixl"

    def __init__(
        self,
        *,
        agent_name: str | None = None,
        listen_port: int | None = None,
        progress_thread: bool = False,
        transfer_timeout: float = 60.0,
        remote_timeout: float = 60.0,
        poll_interval: tuple[float, float] = (20e-6, 2e-3),
        max_pending: int = 1024,
        max_early_notifications: int = 4096,
        fault_hook: Callable[[TransferJob], None] | None = None,
    ) -> None:
        api = load_nixl()
        self._api = api
        self.agent_name = agent_name or f"kvsched-{os.getpid()}-{uuid_module.uuid4().hex[:12]}"
        config = api.nixl_agent_config(
            enable_prog_thread=progress_thread,
            enable_listen_thread=listen_port is not None,
            listen_port=listen_port or 0,
            backends=["UCX"],
        )
        self._agent = api.nixl_agent(self.agent_name, config)
        self.listening = listen_port is not None
        self.progress_thread = progress_thread
        if "UCX" not in self._agent.backends:
            raise TransferError(f"NIXL started without its UCX backend (plugins: {self._agent.plugin_list})")
        self.transfer_timeout = transfer_timeout
        self.remote_timeout = remote_timeout
        self.poll_min, self.poll_max = poll_interval
        self.max_pending = max_pending
        self.max_early = max_early_notifications
        self.fault_hook = fault_hook

        self._lock = threading.Lock()  # the agent and every table below
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._inflight: list[_Xfer] = []
        self._deferred: list[_Deferred] = []
        self._expected: dict[str, _Expectation] = {}
        self._early: OrderedDict[str, tuple[str, bytes | None]] = OrderedDict()  # uuid -> (peer, error)
        self._early_at: dict[str, float] = {}
        self._recent: deque[str] = deque()
        self._recent_set: set[str] = set()
        self._registered: dict[int, tuple[BlockPool, Any]] = {}
        self._peers: dict[str, int] = {}  # peer -> remote pools imported
        self._pool_notes: dict[str, list[bytes]] = {}  # pool descriptions received by notification
        self._closing = False
        self._stats = {"posted": 0, "notified": 0, "early": 0, "late": 0, "foreign": 0,
                       "timed_out": 0, "peer_errors": 0, "expect_timed_out": 0, "cancels_sent": 0}
        self._thread = threading.Thread(target=self._run, name="kvsched-nixl", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ pools

    def register_pool(self, pool: BlockPool) -> None:
        """Register a local pool's memory with the agent (once; kept until close)."""
        if isinstance(pool, RemotePool):
            raise InvalidArgumentError("a remote pool is the peer's memory: it cannot be registered here")
        if not isinstance(pool, BlockPool):
            raise TypeError(f"pool must be a kvsched.BlockPool, not {type(pool).__name__}")
        with self._lock:
            self._check_open()
            if id(pool) in self._registered and self._registered[id(pool)][0] is pool:
                return
            mem = "VRAM" if pool.is_cuda else "DRAM"
            dev = pool.device_index or 0
            regions = [(addr, size, dev, "") for addr, size in pool.extents()]
            try:
                descs = self._agent.register_memory(regions, mem)
            except Exception as exc:  # noqa: BLE001 - NIXL's own exception types
                raise TransferError(f"NIXL could not register the pool's memory: {_nixl_reason(exc)}") from exc
            # The pool (and so its arrays) stays referenced while registered: the memory must
            # outlive its registration.
            self._registered[id(pool)] = (pool, descs)

    def export_pool(self, pool: BlockPool, *, with_metadata: bool = True) -> bytes:
        self.register_pool(pool)
        with self._lock:
            metadata = self._agent.get_agent_metadata() if with_metadata else None
        return encode_pool(pool, self.agent_name, metadata)

    def metadata(self) -> bytes:
        with self._lock:
            self._check_open()
            return bytes(self._agent.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's agent metadata; returns its agent name."""
        if not isinstance(metadata, (bytes, bytearray, memoryview)) or not bytes(metadata):
            raise TypeError("peer metadata must be non-empty bytes (from the peer's metadata())")
        with self._lock:
            self._check_open()
            try:
                name = self._agent.add_remote_agent(bytes(metadata))
            except Exception as exc:  # noqa: BLE001
                raise InvalidArgumentError(f"NIXL refused the peer's metadata: {_nixl_reason(exc)}") from None
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            self._peers.setdefault(name, 0)
            return name

    def import_pool(self, description: Any) -> RemotePool:
        pool, metadata = decode_pool(description, importer=self)
        if pool.peer == self.agent_name:
            raise InvalidArgumentError("the pool description is this engine's own pool")
        if metadata is not None:
            name = self.add_peer(metadata)
            if name != pool.peer:
                raise InvalidArgumentError(
                    f"the pool description names agent {pool.peer!r} but its metadata is agent {name!r}"
                )
        with self._lock:
            self._check_open()
            if metadata is None and not self._agent.check_remote_metadata(pool.peer):
                raise InvalidArgumentError(
                    f"no metadata for peer {pool.peer!r}: export the pool with its metadata, or connect() first"
                )
            self._peers[pool.peer] = self._peers.get(pool.peer, 0) + 1
        return pool

    def connect(self, peer: str, host: str, port: int, timeout: float) -> None:
        """Exchange agent metadata with ``peer``'s listener at ``host:port`` (NIXL's own channel)."""
        if not self.listening:
            raise InvalidArgumentError(
                "connect() needs a listener on this engine too (listen_port=...): NIXL's listener "
                "thread carries both directions of the metadata exchange"
            )
        with self._lock:
            self._check_open()
            self._agent.fetch_remote_metadata(peer, host, port)
            self._agent.send_local_metadata(host, port)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._agent.check_remote_metadata(peer):
                    self._peers.setdefault(peer, 0)
                    return
            if time.monotonic() >= deadline:
                raise TransferError(f"no metadata from peer {peer!r} at {host}:{port} within {timeout:g} s")
            time.sleep(0.005)

    def send_pool(self, peer: str, pool: BlockPool, timeout: float) -> None:
        """Send ``pool``'s description to a connected peer as a notification, once the peer's
        metadata is here (it comes through the listener: a peer that just ran ``connect`` may not
        have been heard yet). The description carries this agent's metadata as it is now: the
        copy the peer fetched when it connected does not list memory registered since."""
        self.register_pool(pool)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._check_open()
                if self._agent.check_remote_metadata(peer):
                    break
            if time.monotonic() >= deadline:
                raise TransferError(f"no metadata from peer {peer!r} within {timeout:g} s: has it connected?")
            time.sleep(0.005)
        with self._lock:
            self._check_open()
            desc = encode_pool(pool, self.agent_name, self._agent.get_agent_metadata())
            try:
                self._agent.send_notif(peer, _POOL_PREFIX + desc)
            except Exception as exc:  # noqa: BLE001
                raise TransferError(f"could not send the pool description to {peer!r}: {_nixl_reason(exc)}") from exc

    def receive_pool(self, peer: str, timeout: float) -> RemotePool:
        """The next pool description ``peer`` sent with ``send_pool``, imported."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                self._check_open()
                notes = self._pool_notes.get(peer)
                if notes:
                    desc = notes.pop(0)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferError(f"no pool description from peer {peer!r} within {timeout:g} s")
                self._wake.notify()  # the completion thread polls notifications sooner
                self._idle.wait(min(left, 0.01))
        return self.import_pool(desc)

    def forget_peer(self, peer: str) -> None:
        with self._lock:
            self._check_open()
            self._peers.pop(peer, None)
            try:
                self._agent.remove_remote_agent(peer)
            except Exception as exc:  # noqa: BLE001
                raise InvalidArgumentError(f"unknown peer {peer!r}: {_nixl_reason(exc)}") from None

    # ------------------------------------------------------------------------------ submit

    @property
    def pending(self) -> int:
        return len(self._inflight) + len(self._deferred) + len(self._expected)

    def submit(self, job: TransferJob, compute_event: Any = None, wait_event: Any = None) -> None:
        plan = job.plan
        src, dst = plan.src, plan.dst
        if isinstance(dst, RemotePool) and isinstance(src, RemotePool):
            raise InvalidArgumentError("both pools are remote: one side of a NIXL transfer must be local")
        if isinstance(dst, RemotePool):
            op, local, remote = "WRITE", src, dst
        elif isinstance(src, RemotePool):
            op, local, remote = "READ", dst, src
        else:
            raise InvalidArgumentError("the nixl backend moves blocks to or from a remote pool")
        if remote._importer is not self:
            raise InvalidArgumentError(
                f"remote pool of peer {remote.peer!r} was imported by another engine; import it into this one"
            )
        waits = event_list(compute_event) + event_list(wait_event)
        for ev in waits:
            if not callable(getattr(ev, "is_set", None)):
                raise InvalidArgumentError(
                    "nixl backend: events must be host events with is_set() (threading.Event); "
                    "synchronize CUDA work before submitting a NIXL transfer"
                )
        self.register_pool(local)
        local_dev, remote_dev = local.device_index or 0, remote.device_id
        local_descs: Any
        remote_descs: Any
        if plan.num_copies <= LIST_SEGMENTS:
            # A few descriptors: (addr, len, dev) tuples made in plain Python, which NIXL takes
            # as they are; a dozen numpy calls cost more (and run with the caches cold: a job's
            # bytes just went through them).
            s_list, d_list, size_list = plan.segment_lists()
            local_list, remote_list = (s_list, d_list) if op == "WRITE" else (d_list, s_list)
            local_descs = [(a, n, local_dev) for a, n in zip(local_list, size_list)]
            remote_descs = [(a, n, remote_dev) for a, n in zip(remote_list, size_list)]
        else:
            s_addrs, d_addrs, sizes = plan.segments()
            local_addrs, remote_addrs = (s_addrs, d_addrs) if op == "WRITE" else (d_addrs, s_addrs)
            local_descs = _descs(local_addrs, sizes, local_dev)
            remote_descs = _descs(remote_addrs, sizes, remote_dev)
        local_mem = "VRAM" if local.is_cuda else "DRAM"
        tag = _uuid_text(job.uuid)
        note = NOTIFY_PREFIX + f"{tag} ok {plan.nbytes}".encode("ascii")

        def post() -> tuple[TransferJob, Any] | None:  # called with self._lock held
            return self._post(job, op, local_descs, local_mem, remote_descs, remote, note, tag)

        job.attach((op, remote.peer))
        with self._lock:
            self._check_open()
            if self.pending >= self.max_pending:
                raise TransferQueueFullError(
                    f"{self.pending} NIXL transfers in flight (max_pending={self.max_pending}); "
                    f"request {job.request_id!r} op {job.uuid} was not submitted, retry later"
                )
            ended = None
            if waits and not all(ev.is_set() for ev in waits):
                self._deferred.append(_Deferred(job, waits, post))
            else:
                ended = post()
            self._wake.notify()
        if ended is not None:  # it ended at once (done, or failed to post): finish it here
            ended[0]._finish(ended[1])
            self._ended(ended[0])

    def _post(self, job: TransferJob, op: str, local_descs: Any, local_mem: str,
              remote_descs: Any, remote: RemotePool, note: bytes, tag: str) -> tuple[TransferJob, Any] | None:
        """Post one transfer (lock held). Returns (job, error) when it ended at once."""
        agent = self._agent
        try:
            if self.fault_hook is not None:
                self.fault_hook(job)
            handle = agent.initialize_xfer(
                op,
                agent.get_xfer_descs(local_descs, local_mem),
                agent.get_xfer_descs(remote_descs, remote.mem_type),
                remote.peer,
                note,
            )
        except Exception as exc:  # noqa: BLE001 - the peer's state (stale pool, gone): fail the job
            self._notify_failure(remote.peer, tag, exc)
            return job, TransferError(f"NIXL {op} to peer {remote.peer!r} not posted: {_nixl_reason(exc)}")
        try:
            state = agent.transfer(handle)
        except Exception as exc:  # noqa: BLE001 - e.g. the peer disconnected
            self._release(handle)
            self._stats["peer_errors"] += 1
            self._notify_failure(remote.peer, tag, exc)
            return job, TransferError(f"NIXL {op} with peer {remote.peer!r} failed: {_nixl_reason(exc)}")
        self._stats["posted"] += 1
        if state == "DONE":
            self._release(handle)
            return job, None
        if state != "PROC":
            self._release(handle)
            self._notify_failure(remote.peer, tag, "transfer state ERR")
            return job, TransferError(f"NIXL {op} with peer {remote.peer!r} failed at once (state {state})")
        self._inflight.append(_Xfer(job, handle, remote.peer))
        return None

    # ------------------------------------------------------------------------------ the other side

    def expect(self, job: TransferJob, peer: str | None, timeout: float) -> None:
        """Finish ``job`` when a peer's notification for ``job.uuid`` arrives (from ``peer`` if
        given), or fail it after ``timeout`` seconds."""
        tag = _uuid_text(job.uuid)
        job.attach(("expect", peer))
        with self._lock:
            self._check_open()
            if tag in self._expected:
                raise ProtocolError(f"op {job.uuid} is already expected from a peer")
            if self.pending >= self.max_pending:
                raise TransferQueueFullError(
                    f"{self.pending} NIXL transfers and expectations pending (max_pending={self.max_pending})"
                )
            early = self._early.get(tag)
            if early is not None and (peer is None or early[0] == peer):
                del self._early[tag]
                self._early_at.pop(tag, None)
                self._remember(tag)
                ready: tuple[str, bytes | None] | None = early
            else:
                ready = None
                self._expected[tag] = _Expectation(job, peer, time.monotonic() + timeout)
                self._wake.notify()
        if ready is not None:
            job._finish(_remote_error(ready))
            self._ended(job)

    def cancel_remote(self, peer: str, uuid: Any, reason: str) -> None:
        """Send ``peer`` the failure notification of operation ``uuid`` (it will not happen)."""
        try:
            tag = _uuid_text(uuid)
        except (TypeError, ValueError, AttributeError):
            raise InvalidArgumentError(f"uuid must be a UUID (or its text), got {uuid!r}") from None
        with self._lock:
            self._check_open()
            self._notify_failure(peer, tag, reason)
            self._stats["cancels_sent"] += 1

    # ------------------------------------------------------------------------------ completion thread

    def _run(self) -> None:
        delay = self.poll_min
        while True:
            finished: list[tuple[TransferJob, Any]] = []
            with self._lock:
                if self._closing and not self._inflight and not self._deferred:
                    expectations = list(self._expected.values())
                    self._expected.clear()
                    finished.extend(
                        (e.job, TransferEngineClosedError("the transfer engine closed before the peer's notification"))
                        for e in expectations
                    )
                    self._idle.notify_all()
                    stop = True
                else:
                    stop = False
                    progressed = self._poll_locked(finished)
            for job, error in finished:
                job._finish(error)
                self._ended(job)
            if stop:
                return
            with self._lock:
                self._idle.notify_all()
                if progressed or finished:
                    delay = self.poll_min
                else:
                    delay = min(delay * 2, self.poll_max)
                busy = self._inflight or self._deferred or self._expected
                # Idle: still look at notifications now and then (early ones, pool descriptions).
                # Without NIXL's progress thread, these polls are what progresses UCX (incoming
                # transfers too), so the idle poll stays at poll_max.
                idle = self.poll_max if not self.progress_thread else max(self.poll_max, 0.02)
                self._wake.wait(delay if busy else idle)

    def _poll_locked(self, finished: list[tuple[TransferJob, Any]]) -> bool:
        now = time.monotonic()
        progressed = False
        agent = self._agent
        still: list[_Xfer] = []
        for x in self._inflight:
            try:
                state = agent.check_xfer_state(x.handle)
                error: Any = None
            except Exception as exc:  # noqa: BLE001 - NIXL raises for a disconnected peer
                state, error = "ERR", exc
            if state == "PROC" and not x.cancelling and now - x.posted_at > self.transfer_timeout:
                x.cancelling = True
                self._stats["timed_out"] += 1
            if state == "PROC" and x.cancelling:
                # Report the job ended only once NIXL has cancelled it: a transfer that may still
                # land must keep its blocks.
                if self._release(x.handle):
                    state, error = "ERR", TimeoutError(
                        f"still in progress after {self.transfer_timeout:g} s (transfer_timeout); cancelled"
                    )
            if state == "PROC":
                still.append(x)
                continue
            progressed = True
            if state == "DONE":
                self._release(x.handle)
                finished.append((x.job, None))
                continue
            if error is None:
                error = "transfer state ERR"
            if not x.cancelling:
                self._release(x.handle)
            self._stats["peer_errors"] += 1
            tag = _uuid_text(x.job.uuid)
            self._notify_failure(x.peer, tag, error)
            finished.append((x.job, TransferError(f"NIXL transfer with peer {x.peer!r} failed: {_nixl_reason(error)}")))
        self._inflight = still

        if self._deferred:
            waiting: list[_Deferred] = []
            for d in self._deferred:
                if all(ev.is_set() for ev in d.waits):
                    ended = d.post()
                    if ended is not None:
                        finished.append(ended)
                    progressed = True
                elif now - d.since > self.transfer_timeout:
                    finished.append((d.job, TimeoutError(f"event not set within {self.transfer_timeout:g} s")))
                    progressed = True
                else:
                    waiting.append(d)
            self._deferred = waiting

        try:
            notes = agent.get_new_notifs()
        except Exception as exc:  # noqa: BLE001
            log.warning("kvsched: NIXL get_new_notifs failed: %s", _nixl_reason(exc))
            notes = {}
        for sender, messages in notes.items():
            peer = sender.decode("utf-8", "replace") if isinstance(sender, bytes) else str(sender)
            for msg in messages:
                progressed = self._on_notification(peer, bytes(msg), finished) or progressed

        for tag, e in list(self._expected.items()):
            if now >= e.deadline:
                del self._expected[tag]
                self._remember(tag)
                self._stats["expect_timed_out"] += 1
                who = f"peer {e.peer!r}" if e.peer is not None else "any peer"
                finished.append((e.job, TimeoutError(
                    f"no notification from {who} for op {e.job.uuid} within the remote timeout "
                    "(the peer may be gone)"
                )))
                progressed = True
        if self._early:
            for tag in [t for t, at in self._early_at.items() if now - at > self.remote_timeout]:
                self._early.pop(tag, None)
                self._early_at.pop(tag, None)
        return progressed

    def _on_notification(self, peer: str, msg: bytes, finished: list[tuple[TransferJob, Any]]) -> bool:
        if msg.startswith(_POOL_PREFIX):
            notes = self._pool_notes.setdefault(peer, [])
            if len(notes) < 64:
                notes.append(msg[len(_POOL_PREFIX):])
            return True
        if not msg.startswith(NOTIFY_PREFIX):
            self._stats["foreign"] += 1
            return False
        parts = msg[len(NOTIFY_PREFIX):].split(b" ", 2)
        tag = parts[0].decode("ascii", "replace")
        if len(tag) != 32 or len(parts) < 2 or parts[1] not in (b"ok", b"err"):
            self._stats["foreign"] += 1
            return False
        error = None if parts[1] == b"ok" else (parts[2] if len(parts) > 2 else b"")[:_MAX_REASON]
        self._stats["notified"] += 1
        e = self._expected.get(tag)
        if e is not None and (e.peer is None or e.peer == peer):
            del self._expected[tag]
            self._remember(tag)
            finished.append((e.job, _remote_error((peer, error))))
            return True
        if tag in self._recent_set:
            self._stats["late"] += 1  # already ended (timed out, or a repeat): counted once
            return False
        self._stats["early"] += 1
        self._early[tag] = (peer, error)
        self._early_at[tag] = time.monotonic()
        while len(self._early) > self.max_early:
            old, _ = self._early.popitem(last=False)
            self._early_at.pop(old, None)
        return False

    def _remember(self, tag: str) -> None:
        self._recent.append(tag)
        self._recent_set.add(tag)
        if len(self._recent) > _RECENT_UUIDS:
            self._recent_set.discard(self._recent.popleft())

    def _ended(self, job: TransferJob) -> None:
        with self._lock:
            self._idle.notify_all()

    def _notify_failure(self, peer: str, tag: str, error: Any) -> None:
        reason = _nixl_reason(error).encode("utf-8", "replace")[:_MAX_REASON]
        try:
            self._agent.send_notif(peer, NOTIFY_PREFIX + tag.encode("ascii") + b" err " + reason)
        except Exception:  # noqa: BLE001 - the peer may be gone; its expectation times out
            pass

    def _release(self, handle: Any) -> bool:
        try:
            self._agent.release_xfer_handle(handle)
            return True
        except Exception as exc:  # noqa: BLE001 - NIXL could not cancel an active transfer
            log.debug("kvsched: NIXL release_xfer_handle: %s", _nixl_reason(exc))
            return False

    # ------------------------------------------------------------------------------ life

    def _check_open(self) -> None:
        if self._closing:
            raise TransferEngineClosedError("the transfer engine is closed")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
            out["inflight"] = len(self._inflight)
            out["expected"] = len(self._expected)
            out["early_waiting"] = len(self._early)
            out["peers"] = sorted(self._peers)
            out["agent"] = self.agent_name
        return out

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            self._wake.notify()
            return self._idle.wait_for(lambda: self.pending == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new work, let transfers in flight end, fail expectations still waiting, stop the
        completion thread, deregister memory. Idempotent; False (nothing released) on timeout."""
        with self._lock:
            self._closing = True
            self._wake.notify()
            idle = self._idle.wait_for(lambda: not self._inflight and not self._deferred, timeout)
            self._wake.notify()
        if not idle:
            return False
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        with self._lock:
            for pool, descs in list(self._registered.values()):
                try:
                    self._agent.deregister_memory(descs)
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
            self._registered.clear()
        return True

    def abandon(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify()


def _descs(addrs: np.ndarray, sizes: np.ndarray, device: int) -> np.ndarray:
    out = np.empty((addrs.shape[0], 3), dtype=np.uint64)
    out[:, 0] = addrs
    out[:, 1] = sizes
    out[:, 2] = device
    return out


def _uuid_text(value: Any) -> str:
    if isinstance(value, uuid_module.UUID):
        return value.hex
    return uuid_module.UUID(str(value)).hex


def _remote_error(note: tuple[str, bytes | None]) -> Any:
    peer, error = note
    if error is None:
        return None
    return TransferError(f"peer {peer!r} reported its transfer failed: {error.decode('utf-8', 'replace')}")


def _nixl_reason(error: Any) -> str:
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return str(error)
