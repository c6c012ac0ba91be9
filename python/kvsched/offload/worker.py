"""``OffloadWorker``: the worker side of a host tier (one per GPU process).

It owns a kvsched :class:`~kvsched.Scheduler`, a :class:`~kvsched.TransferEngine` and the host
pool, and runs each step's :class:`StepPlan`. Every load and store is a kvsched operation joined
from both halves: the worker half (``enqueue`` into the request's slot) and the transfer half
(``schedule`` with the operation's requirement). Decided handles (their ``decision`` read at each hook) are
submitted to the engine, which marks them when the bytes have landed; ended requests come
from ``worker.take_finished``, never from polling every request.

Calls per engine step, in the order an engine's model runner makes them::

    begin_step(plan)          # cancel/fence preempted and aborted requests; a step with
                              # stores starts an iteration and joins them in the step's own
                              # slot: one operation per layer (layer k gated on
                              # LayerComplete(k, it)) or one per step (gated on the last layer)
    start_loads(event)        # loads: joined now, no requirement (before the forward pass in
                              # layerwise mode, after it in async mode)
    wait_layer_load(k, stream)  # layerwise: layer k waits for its blocks (GPU: the stream
                              # waits on the copy's event; host backend: the CPU waits)
    layer_done(k, event)      # layer k's KV is written: mark it, submit its stores (GPU: the
                              # copy stream waits for ``event``; the caller never waits); per
                              # step: the last layer completes the iteration and submits
    end_step()                # mark the iteration complete (layers an engine skipped too)
    collect(finished) -> StepResults   # ended requests, failed blocks, per-op reports

Stores of one step share their operations: a copy is one transfer job for every request that
stores in that step, one per layer and step (``op_granularity: "layer"``, the cuda backend's
default: each layer's copy overlaps the rest of the forward pass) or one per step (``"step"``,
the host backend's default: no GPU stream to overlap with, and each submission and copy-thread
wake-up costs the forward thread). A step without stores starts no kvsched iteration, so its
layer hooks make no call into the core. A request's stores
are reported, and the request released, when every step batch holding them ended. Stores are
never cancelled (a batch is shared; it runs within the step's forward pass anyway): an aborted
request waits for them to drain, a preempted one is fenced until they ended. Loads are per
request in async mode (one operation in the request's slot, cancelled on abort or preemption)
and, in layerwise mode, shared by the step's loads like stores, per layer or per step (they run
within the step; layer k's forward waits for the job holding layer k).

Layer marks follow kvsched's S7 (each the next index); a hook that skips layers is covered by
marking the ones in between, and ``end_step`` marks the whole iteration (S2).
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable

import numpy as np

from kvsched.errors import InvalidArgumentError, KvschedError
from kvsched.offload.config import OffloadConfig
from kvsched.offload.plan import LoadSpec, OpReports, RecvSpec, SendSpec, StepPlan, StoreSpec
from kvsched.pool import BlockPool
from kvsched.protocol import Decision, LayerComplete, RequestMode, TransferKind
from kvsched.transfer.plan import _SMALL as _FEW_PAIRS  # build_plan checks this many in plain Python

__all__ = ["OffloadWorker", "StepResults"]

log = logging.getLogger("kvsched")

_EXECUTE = Decision.EXECUTE
_LOAD_OP, _STORE_OP, _SEND_OP = 0, 1, 2  # _Op.kind; a read from a peer is a load with a remote source
_PEER_ROLES = (None, "producer", "consumer")
_MAX_PEER_POOLS = 64  # imported producer pools kept (a consumer reads from a few producers)


@dataclass
class StepResults:
    """What one step's :meth:`OffloadWorker.collect` found.

    * ``finished_sending``: requests of ``StepPlan.release`` whose operations all ended (the
      engine may free their blocks now);
    * ``finished_recving``: requests whose asynchronous load ended (ok or not);
    * ``failed_blocks``: GPU blocks whose load failed (the engine recomputes them);
    * ``reports``: per-operation outcomes for the scheduler side."""

    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_blocks: set[int] = field(default_factory=set)
    reports: OpReports = field(default_factory=OpReports)


# What collect() returns when nothing ended since the last call (most decode steps): one shared,
# read-only value, so an idle step allocates nothing. Frozen sets and a read-only report map:
# a caller that tries to add to it gets an error instead of changing what every later idle
# step returns.
_NOTHING = StepResults(frozenset(), frozenset(), frozenset(),  # type: ignore[arg-type]
                       OpReports(MappingProxyType({})))  # type: ignore[arg-type]


class _Op:
    __slots__ = ("op_id", "kind", "req_id", "slot", "gpu", "host", "layers", "parts", "handles", "jobs",
                 "settled", "cancelled", "ended", "layerwise", "events", "submitted", "specs", "pairs", "remote")

    def __init__(self, op_id: int, kind: int, req_id: str, slot: str, gpu: list[int], host: list[int],
                 layers: list[int | None], layerwise: bool, events: list[Any] | None) -> None:
        self.op_id, self.kind, self.req_id, self.slot = op_id, kind, req_id, slot
        self.gpu, self.host = gpu, host
        self.layers = layers  # per part: the layer it copies (None: every layer)
        self.parts = len(layers)
        self.handles: list[Any] = [None] * self.parts
        self.jobs: list[Any] = [None] * self.parts
        self.settled = [False] * self.parts  # ended without a job (decided CANCEL, or failed unsubmitted)
        self.cancelled = False  # a part was decided CANCEL, or the request was cancelled
        self.ended = False
        self.layerwise = layerwise
        self.events = events  # stores: the iteration's per-layer compute events (GPU)
        self.submitted = 0
        self.specs: list[Any] = []  # a batch: the requests' StoreSpecs (or layerwise LoadSpecs) it carries
        self.pairs: Any = None  # (N, 2) source and destination block ids, made at the first submit
        self.remote: Any = None  # a read from a peer: its RemotePool (or the exception importing it)


class OffloadWorker:
    """Worker side of a host tier. ``OffloadWorker(config, world_size=1, rank=0)``, then
    :meth:`register` with the GPU pool. ``engine_options`` go to the TransferEngine (tests:
    ``fault_hook``)."""

    def __init__(self, config: OffloadConfig, *, world_size: int = 1, rank: int = 0,
                 engine_options: dict[str, Any] | None = None, peer_role: str | None = None) -> None:
        if peer_role not in _PEER_ROLES:
            raise InvalidArgumentError(f"peer_role must be one of {_PEER_ROLES}, got {peer_role!r}")
        self.config = config
        # Disaggregated serving: "producer" (a peer reads finished requests' blocks) or
        # "consumer" (this worker reads a peer's); either makes a NIXL engine at register().
        self.peer_role = peer_role
        self.remote_engine: Any = None
        # Disaggregated serving: this worker's GPU pool as TransferEngine.export_pool bytes
        # (NIXL agent metadata included), for the scheduler side to hand to the peers.
        self.pool_description: bytes | None = None
        self._peer_pools: OrderedDict[bytes, Any] = OrderedDict()
        self._step_recvs: list[RecvSpec] = []
        self.world_size = world_size
        self.rank = rank
        self._engine_options = dict(engine_options or {})
        self.scheduler: Any = None
        self.engine: Any = None
        self._w: Any = None  # the scheduler's worker and transfer sides
        self._t: Any = None
        self.gpu_pool: BlockPool | None = None
        self.host_pool: BlockPool | None = None
        self.host_blocks = 0
        self.num_layers = 0
        self._block_bytes = 0
        self._host_owner: Any = None
        self._iteration = 0
        self._step = 0  # begin_step calls: names the step's batch slots
        self._next_layer = 0
        self._in_iteration = False
        # True while this step's layers gate stores: only then does layer_done() do anything
        # (an engine may skip the call, and recording a compute event for it, otherwise).
        self.wants_layer_events = False
        # The first layer whose layer_done() can release a store: 0 per layer, the last layer
        # per step. A caller with no compute event to pass may skip the calls for earlier
        # layers (a later call, or end_step, covers them).
        self.first_gating_layer = 0
        self._events: list[Any] = []
        # Parts joined and not dispatched yet: part uuid -> (op, part index). A part gated on a
        # layer of this iteration waits in _gates[layer] until that layer is marked (its
        # decision is read then, not at every hook); every other one is in _waiting (its
        # decision is read at each hook until it is decided: loads, and parts a token was not
        # free for when their gate opened).
        self._ops: dict[Any, tuple[_Op, int]] = {}
        self._gates: dict[int, list[Any]] = {}
        self._waiting: dict[Any, None] = {}  # an ordered set of part uuids
        self._slot_ops: dict[str, list[_Op]] = {}  # slot -> ops not yet ended
        self._rid_slot: dict[str, str] = {}  # request -> its current slot
        self._rid_slots: dict[str, set[str]] = {}  # request -> its load slots not yet removed
        self._rid_batches: dict[str, set[str]] = {}  # request -> store batches (step slots) not ended
        self._generation: dict[str, int] = {}
        self._cancelled_rids: set[str] = set()
        self._release: set[str] = set()
        self._finished_rids: set[str] = set()
        self._step_loads: list[LoadSpec] = []
        self._fenced: StepPlan | None = None  # the plan whose preemptions were fenced already
        self._layer_loads: list[_Op] = []
        self._per_layer = True  # op_granularity: set by register() once the backend is known
        self._results: StepResults | None = None  # made when the first outcome since collect() arrives
        self.stats = _new_stats()
        # True once a counter of self.stats moved since take_stats(): an engine asks for stats
        # every step, and most steps move none.
        self.stats_changed = False

    # ------------------------------------------------------------------------------ setup

    def register(self, gpu_pool: BlockPool, host_pool: BlockPool | None = None) -> None:
        """Build the scheduler, the engine and (unless given) the host pool for ``gpu_pool``.
        The host pool holds ``host_bytes / world_size`` bytes of whole blocks: page-locked
        (torch ``pin_memory``) when the GPU pool is on a GPU, plain numpy memory otherwise."""
        from kvsched import Scheduler, TransferEngine

        self.gpu_pool = gpu_pool
        self.num_layers = gpu_pool.num_layers
        self._block_bytes = gpu_pool.block_bytes * gpu_pool.num_layers  # one block, every layer
        self.host_blocks = self.config.num_host_blocks(gpu_pool.block_bytes * gpu_pool.num_layers, self.world_size)
        if host_pool is None:
            host_pool = self._make_host_pool(gpu_pool, self.host_blocks)
        elif not host_pool.same_geometry(gpu_pool) or host_pool.num_layers != gpu_pool.num_layers:
            raise InvalidArgumentError(f"host pool {host_pool} does not match the GPU pool {gpu_pool}")
        self.host_pool = host_pool
        self.scheduler = Scheduler(
            max_inflight=self.config.max_inflight, op_timeout=self.config.op_timeout, num_layers=self.num_layers,
        )
        self._w, self._t = self.scheduler.worker, self.scheduler.transfer
        options = dict(self._engine_options)
        if "host" not in options:
            # One host copy thread: a step's few small jobs then wake one thread, not one each
            # (a wake-up costs the submitting thread tens of microseconds on a VM), and copies
            # of one step run in order anyway.
            options.setdefault("workers", 1)
        self.engine = TransferEngine(self.scheduler, backend=self.config.backend, **options)
        granularity = self.config.op_granularity
        self._per_layer = granularity == "layer" or (granularity == "auto" and self.engine.backend == "cuda")
        self.first_gating_layer = 0 if self._per_layer else self.num_layers - 1
        if self.peer_role is not None:
            # One NIXL agent per worker for the peer's transfers (the tier's copies stay on the
            # engine above: NIXL moves bytes between processes, not within one). The GPU pool
            # is registered with it and described for the peer, once.
            self.remote_engine = TransferEngine(self.scheduler, backend="nixl")
            self.pool_description = self.remote_engine.export_pool(gpu_pool)
        log.info("kvsched offload worker %d/%d: %d host blocks of %d bytes x %d layers, backend %s, "
                 "operations per %s%s", self.rank, self.world_size, self.host_blocks, gpu_pool.block_bytes,
                 self.num_layers, self.engine.backend, "layer" if self._per_layer else "step",
                 "" if self.peer_role is None else f", disaggregated {self.peer_role}")

    def _make_host_pool(self, gpu_pool: BlockPool, n: int) -> BlockPool:
        shape = (gpu_pool.num_layers, gpu_pool.num_pieces, n, gpu_pool.piece_bytes)
        if gpu_pool.is_cuda:
            import torch  # a GPU pool implies a GPU stack; pinned memory makes copies async

            arr: Any = torch.zeros(shape, dtype=torch.uint8, pin_memory=True)
        else:
            arr = np.zeros(shape, dtype=np.uint8)
        self._host_owner = arr
        return BlockPool.from_array(arr, block_dim=2)

    @property
    def backend(self) -> str | None:
        return None if self.engine is None else self.engine.backend

    # ------------------------------------------------------------------------------ step

    def begin_step(self, plan: StepPlan | None) -> int | None:
        """Start a step and take the plan's cancellations and stores (loads wait for
        :meth:`start_loads`). A step with stores starts a kvsched iteration, whose layers gate
        them; a step without (most decode steps) starts none, and its layer hooks cost nothing:
        no operation waits on its layers. Returns the iteration number, or None."""
        self._require_registered()
        if self._in_iteration:  # the previous step's hooks never ended it
            self._end_iteration()
        if self._step_loads or self._step_recvs:  # an engine skipped start_load_kv: never drop one
            self.start_loads()
        self._step += 1
        self._next_layer = 0
        if self._layer_loads:
            self._layer_loads = []
        if plan is not None:
            if plan.host_blocks and plan.host_blocks != self.host_blocks:
                raise InvalidArgumentError(
                    f"the scheduler side plans for {plan.host_blocks} host blocks, this worker has "
                    f"{self.host_blocks}: both must derive the capacity from the same host_bytes and block size"
                )
            if plan.recvs:  # checked before the plan changes anything
                self._require_peer_role("consumer", "reads from a peer")
            if plan.sends:
                self._require_peer_role("producer", "peer reads")
            if plan.preempted and self._fenced is not plan:
                self.fence_preempted(plan)
            self._fenced = None
            for rid in plan.aborted:
                self._cancel_request(rid, fence=False, new_generation=False)
            if plan.stores:
                self._iteration = self._w.start_next_iteration()
                self._in_iteration = self.wants_layer_events = True
                self._events = []
                self._join_stores(plan.stores)
            if plan.loads:
                self._step_loads = list(plan.loads)
            if plan.recvs:
                self._step_recvs = [rs for rs in plan.recvs if not rs.cancel]
                for rs in plan.recvs:
                    if rs.cancel:
                        self._tell_producer(rs.pools[self.rank], rs.op_id, f"request {rs.req_id!r} ended before its read")
            if plan.sends:
                self._join_sends(plan.sends)
            for rid in plan.release:
                self._release.add(rid)
                self._finished_rids.add(rid)
        return self._iteration if self._in_iteration else None

    def fence_preempted(self, plan: StepPlan | None) -> None:
        """The plan's preempted requests: cancel their loads that have not started and wait
        until no copy touches their GPU blocks. Call it before the engine reuses those blocks
        (vLLM: ``handle_preemptions``, before it zeroes new blocks); ``begin_step`` calls it
        for a plan that did not get it."""
        if plan is None or not plan.preempted:
            return
        self._require_registered()
        for rid in plan.preempted:
            self._cancel_request(rid, fence=True, new_generation=True)
        self._fenced = plan

    def _join_stores(self, specs: list[StoreSpec]) -> None:
        """This step's stores, all requests together, in the step's own slot: per layer (one
        kvsched operation per layer, layer k gated on ``LayerComplete(k, iteration)``) or per
        step (one operation for every layer, gated on the last layer). A copy is then one
        transfer job for every request (one submit per layer or per step, not per request);
        each request's store is reported when all parts of its step's batch ended."""
        w, t, it, L = self._w, self._t, self._iteration, self.num_layers
        slot = f"\x01step{self._step}"
        w.create_slot(slot)
        self._slot_ops[slot] = []
        gpu = [b for spec in specs for b in spec.gpu_blocks]
        host = [b for spec in specs for b in spec.host_blocks]
        op_id = specs[0].op_id  # the batch's kvsched uuids derive from its first store's id
        layers: list[int | None] = list(range(L)) if self._per_layer else [None]
        op = _Op(op_id, 1, slot, slot, gpu, host, layers, False, self._events)
        op.specs = list(specs)
        uuids = [_part_id(op_id, k) for k in range(op.parts)]
        w.enqueue_many(slot, uuids, TransferKind.STORE)
        self._slot_ops[slot].append(op)
        ops, gates = self._ops, self._gates
        if self._per_layer:
            for k, u in enumerate(uuids):
                op.handles[k] = t.schedule(slot, u, LayerComplete(k, it))
                ops[u] = (op, k)
                gates.setdefault(k, []).append(u)
        else:  # the last layer implies every earlier one (layer marks are in order, S7)
            op.handles[0] = t.schedule(slot, uuids[0], LayerComplete(L - 1, it))
            ops[uuids[0]] = (op, 0)
            gates.setdefault(L - 1, []).append(uuids[0])
        for spec in specs:
            self._rid_batches.setdefault(spec.req_id, set()).add(slot)
        self.stats["stores"] += len(specs)
        self.stats_changed = True

    def _join_sends(self, specs: list[SendSpec]) -> None:
        """Producer: per finished request, an operation in its slot that the consumer's read
        ends. IMMEDIATE (decided at once, no token: the peer runs the copy, this side only
        keeps the blocks), expected from the peer at once; it ends with the peer's
        notification, or fails after ``remote_timeout``. Its request is released (the engine
        frees the blocks) when it ended, as for stores."""
        w, t, ops = self._w, self._t, self._ops
        for spec in specs:
            slot = self._slot(spec.req_id)
            op = _Op(spec.op_id, _SEND_OP, spec.req_id, slot, list(spec.gpu_blocks), [], [None], False, None)
            u = _part_id(spec.op_id, 0)
            w.enqueue(slot, u, TransferKind.STORE, RequestMode.IMMEDIATE)
            self._slot_ops[slot].append(op)
            op.handles[0] = h = t.schedule(slot, u, None, RequestMode.IMMEDIATE)
            ops[u] = (op, 0)
            self._dispatch_one(h, *self._take(u))
            self.stats["sends"] += 1
            self.stats_changed = True

    def _require_peer_role(self, role: str, what: str) -> None:
        if self.peer_role != role:
            raise InvalidArgumentError(
                f"the step plan has {what}, but this worker is not a disaggregated {role} "
                f"(peer_role={self.peer_role!r}: kv_role must be kv_{role} on both sides)"
            )

    def _peer_pool(self, description: bytes) -> Any:
        """The producer's pool for ``description`` (imported once; its agent metadata too)."""
        pools = self._peer_pools
        pool = pools.get(description)
        if pool is None:
            pool = self.remote_engine.import_pool(description)
            pools[description] = pool
            if len(pools) > _MAX_PEER_POOLS:
                pools.popitem(last=False)
        else:
            pools.move_to_end(description)
        return pool

    def _fence(self, ops: Iterable[_Op], timeout: float = 60.0) -> None:
        """Wait until no copy of ``ops`` touches their blocks any more: undecided parts are waited
        for and submitted (or cancelled), running copies waited for."""
        self._dispatch()
        for op in ops:
            for k in range(op.parts):
                if op.jobs[k] is None and not op.settled[k]:
                    u = _part_id(op.op_id, k)
                    if u in self._ops:
                        op.handles[k].wait(timeout)
                        self._dispatch_one(op.handles[k], *self._take(u))
                job = op.jobs[k]
                if job is not None and not job.done():
                    job.wait(timeout)

    def start_loads(self, wait_event: Any = None) -> None:
        """Join this step's loads (no requirement: each runs when a token is free, loads before
        stores). ``wait_event``: the compute stream's event the copies wait for (GPU: the last
        reads of reused blocks)."""
        if not self._step_loads and not self._step_recvs:
            return
        w, t, L = self._w, self._t, self.num_layers
        ops, waiting = self._ops, self._waiting
        loads, self._step_loads = self._step_loads, []
        events = [wait_event] if wait_event is not None else None
        if self._step_recvs:
            recvs, self._step_recvs = self._step_recvs, []
            for rs in recvs:  # reads from the producer: async loads with a remote source
                try:
                    remote: Any = self._peer_pool(rs.pools[self.rank])
                except Exception as exc:  # noqa: BLE001 - a bad description: the read fails, the engine recomputes
                    remote = exc
                self._join_load(rs.req_id, rs.op_id, rs.gpu_blocks, rs.remote_blocks, None, remote)
        layerwise = [spec for spec in loads if spec.layerwise]
        if layerwise:  # one operation per layer (or one per step) for all of them, in the step's load slot
            slot = f"\x02load{self._step}"
            if slot not in self._slot_ops:
                w.create_slot(slot)
                self._slot_ops[slot] = []
            layers: list[int | None] = list(range(L)) if self._per_layer else [None]
            op = _Op(layerwise[0].op_id, 0, slot, slot, [b for sp in layerwise for b in sp.gpu_blocks],
                     [b for sp in layerwise for b in sp.host_blocks], layers, True, events)
            op.specs = layerwise
            uuids = [_part_id(op.op_id, k) for k in range(op.parts)]
            w.enqueue_many(slot, uuids, TransferKind.LOAD)
            self._slot_ops[slot].append(op)
            for k, h in enumerate(t.schedule_many(slot, uuids)):
                op.handles[k] = h
                ops[uuids[k]] = (op, k)
                waiting[uuids[k]] = None
            self._layer_loads.append(op)
            for sp in layerwise:
                self._rid_batches.setdefault(sp.req_id, set()).add(slot)
            self.stats["loads"] += len(layerwise)
            self.stats_changed = True
        for spec in loads:
            if not spec.layerwise:
                self._join_load(spec.req_id, spec.op_id, spec.gpu_blocks, spec.host_blocks, events)
        self._dispatch()

    def _join_load(self, rid: str, op_id: int, gpu: list[int], src: list[int], events: list[Any] | None,
                   remote: Any = None) -> None:
        """One asynchronous load in the request's slot, every layer, no requirement: from host
        slots ``src``, or with ``remote`` (a producer's RemotePool, or the error importing it)
        from that pool's blocks ``src``. Dispatched when decided (a token is free)."""
        slot = self._slot(rid)
        op = _Op(op_id, _LOAD_OP, rid, slot, gpu, src, [None], False, events)
        op.remote = remote
        u = _part_id(op_id, 0)
        self._w.enqueue(slot, u, TransferKind.LOAD)
        self._slot_ops[slot].append(op)
        op.handles[0] = self._t.schedule(slot, u)
        self._ops[u] = (op, 0)
        self._waiting[u] = None
        self.stats["loads"] += 1
        self.stats_changed = True

    def wait_layer_load(self, layer: int, stream: Any = None, timeout: float = 60.0) -> None:
        """Layerwise mode: layer ``layer`` of this step's loads has landed before the layer
        reads it. GPU: ``stream`` waits on the copy's event (no CPU wait); host backend (or no
        stream): the CPU waits for the copy."""
        if not self._layer_loads:
            return
        for op in self._layer_loads:
            part = layer if op.parts > 1 else 0  # one part for every layer: waited for at the first
            job = op.jobs[part]
            if job is None and not op.cancelled:
                self._dispatch()
                job = op.jobs[part]
                h = op.handles[part]
                if job is None and h is not None and (u := _part_id(op.op_id, part)) in self._ops:
                    h.wait(timeout)  # a token is not free yet: loads go first, so this is short
                    self._dispatch_one(h, *self._take(u))
                    job = op.jobs[part]
            if job is None:
                continue  # cancelled: reported as failed blocks at collect()
            if stream is not None and self.engine.backend == "cuda" and job.kind == "h2d":
                job.wait_on(stream)
            else:
                job.wait(timeout)

    @property
    def has_step_loads(self) -> bool:
        """True when :meth:`start_loads` has loads to join (an engine may skip recording the
        compute event for it otherwise)."""
        return bool(self._step_loads or self._step_recvs)

    def layer_done(self, layer: int, compute_event: Any = None) -> None:
        """Layer ``layer``'s KV of this step is written; on a GPU ``compute_event`` (the compute
        stream's event after the layer) is what the stores' copies wait for. Per layer: marks
        it (and any layers an engine hook skipped before it) and submits the stores it
        released. Per step: the last layer completes the iteration and submits the step's
        store; an earlier layer only keeps its event (nothing waits on it alone)."""
        k = self._next_layer
        if layer < k or not self._in_iteration:
            return
        events = self._events
        while len(events) < layer:
            events.append(compute_event)
        events.append(compute_event)
        if not self._per_layer:
            self._next_layer = layer + 1
            if layer >= self.num_layers - 1:
                self._end_iteration()
                if self._waiting:
                    self._dispatch()
            return
        mark, gates = self._w.mark_layer_complete, self._gates
        while k <= layer:
            mark(k)
            self._next_layer = k = k + 1
            if gates:
                self._open_gate(k - 1)
        if self._waiting:
            self._dispatch()

    def end_step(self) -> None:
        """The forward pass ended: every layer of this step's iteration is complete."""
        if self._in_iteration:
            self._end_iteration()
        if self._waiting:
            self._dispatch()

    def collect(self, finished_req_ids: Iterable[str] = ()) -> StepResults:
        """Outcomes since the last call: see :class:`StepResults`. ``finished_req_ids``: the
        requests the engine finished this step (their slots are removed once drained). When
        nothing ended, the result is a shared empty value: treat results as read-only."""
        if self.scheduler is None:
            self._require_registered()
        if self._waiting:
            self._dispatch()
        if finished_req_ids:
            self._finished_rids.update(finished_req_ids)
        # Layerwise loads end within their step (each layer waited for its part): their
        # outcome is reported now, not when the request's slot drains (vLLM wants a failed
        # synchronous load in the step that ran it).
        if self._layer_loads:
            for op in self._layer_loads:
                self._settle_layerwise(op)
            self._layer_loads = []
        if self._slot_ops:  # else no slot of this worker holds an operation: nothing can end
            for slot in self._w.take_finished():
                self._finish_slot(slot)
        if self._finished_rids:
            self._drop_finished_requests()
        results = self._results
        if results is None:
            return _NOTHING
        self._results = None
        return results

    def _drop_finished_requests(self) -> None:
        """Forget the finished requests none of whose slots or store batches is open any more;
        report those the engine waits for (``release``) as finished sending."""
        batches, slots = self._rid_batches, self._rid_slots
        done = [rid for rid in self._finished_rids if not slots.get(rid) and not batches.get(rid)]
        for rid in done:
            self._finished_rids.discard(rid)
            self._rid_slot.pop(rid, None)
            slots.pop(rid, None)
            batches.pop(rid, None)
            self._generation.pop(rid, None)
            self._cancelled_rids.discard(rid)
            if rid in self._release:
                self._release.discard(rid)
                self._out().finished_sending.add(rid)

    # ------------------------------------------------------------------------------ internals

    def _out(self) -> StepResults:
        """The results the next collect() returns (made on the first outcome)."""
        results = self._results
        if results is None:
            results = self._results = StepResults()
        return results

    def _require_registered(self) -> None:
        if self.scheduler is None:
            raise KvschedError("OffloadWorker.register() must be called before the first step")

    def _end_iteration(self) -> None:
        self._w.mark_iteration_complete()
        self._in_iteration = self.wants_layer_events = False
        for layer in list(self._gates):  # every layer of the iteration is complete now
            self._open_gate(layer)

    def _slot(self, rid: str) -> str:
        slot = self._rid_slot.get(rid)
        if slot is None:
            gen = self._generation.get(rid, 0)
            slot = rid if gen == 0 else f"{rid}\x00{gen}"
            self._w.create_slot(slot)
            self._rid_slot[rid] = slot
            self._rid_slots.setdefault(rid, set()).add(slot)
            self._slot_ops[slot] = []
        return slot

    def _cancel_request(self, rid: str, *, fence: bool, new_generation: bool) -> None:
        """Cancel ``rid``'s loads that have not started; with ``fence``, wait (on the CPU) until
        no copy of its loads or of the store batches holding its blocks touches them any more
        (the engine freed them). A load cancelled while its copy ran counts as failed: its
        blocks are recomputed, never trusted."""
        slots = self._rid_slots.get(rid, ())
        w = self._w
        for slot in slots:
            for op in self._slot_ops.get(slot, ()):
                op.cancelled = True
            w.cancel_slot(slot)
        self._dispatch()  # EXECUTE handles of cancelled ops are failed without copying
        if fence:
            ops = [op for slot in slots for op in self._slot_ops.get(slot, ())]
            ops += [op for slot in self._rid_batches.get(rid, ()) for op in self._slot_ops.get(slot, ())]
            self._fence(ops)
            self.stats["preemptions"] += 1
            self.stats_changed = True
        if new_generation:
            self._rid_slot.pop(rid, None)
            self._generation[rid] = self._generation.get(rid, 0) + 1

    def _dispatch(self) -> None:
        """Submit the waiting parts that kvsched has decided since the last call.

        Reads each waiting handle's ``decision`` rather than calling ``transfer.poll`` (which
        costs more even when empty); parts gated on a layer of this iteration are not read
        until their layer is marked (``_open_gate``), so a hook reads only the few parts that
        can have been decided."""
        waiting = self._waiting
        if not waiting:
            return
        ops = self._ops
        ready = []
        for u in waiting:
            entry = ops.get(u)
            if entry is None or entry[0].handles[entry[1]].decision is not None:
                ready.append(u)
        for u in ready:
            del waiting[u]
            entry = ops.pop(u, None)
            if entry is not None:
                self._dispatch_one(entry[0].handles[entry[1]], *entry)

    def _open_gate(self, layer: int) -> None:
        """``layer`` was marked: submit the parts gated on it that kvsched decided (EXECUTE, or
        CANCEL on a timeout); a part no token was free for waits for the next hooks."""
        uuids = self._gates.pop(layer, None)
        if not uuids:
            return
        ops, waiting = self._ops, self._waiting
        for u in uuids:
            entry = ops.get(u)
            if entry is None:
                continue  # dispatched already (a fence)
            h = entry[0].handles[entry[1]]
            if h.decision is None:
                waiting[u] = None
            else:
                del ops[u]
                self._dispatch_one(h, *entry)

    def _take(self, u: Any) -> tuple[_Op, int]:
        """Part ``u``'s entry, no longer waiting (the caller dispatches it)."""
        self._waiting.pop(u, None)
        return self._ops.pop(u)

    def _dispatch_one(self, h: Any, op: _Op, part: int) -> None:
        if h.decision != _EXECUTE:
            op.cancelled = True
            op.settled[part] = True
            return
        if op.cancelled:
            op.settled[part] = True
            h.mark_complete(error=f"request {op.req_id!r} was cancelled before its copy started")
            return
        if op.kind == _SEND_OP or op.remote is not None:
            self._dispatch_remote(h, op, part)
            return
        layer = op.layers[part]
        layers = None if layer is None else [layer]
        pairs = op.pairs
        if op.kind == _LOAD_OP:
            if pairs is None:
                pairs = op.pairs = _pairs(op.host, op.gpu)
            src, dst = self.host_pool, self.gpu_pool
            kwargs = {"wait_event": op.events[0]} if op.events else {}
        else:
            if pairs is None:
                pairs = op.pairs = _pairs(op.gpu, op.host)
            src, dst = self.gpu_pool, self.host_pool
            if op.events is None:
                ev: Any = None
            elif layer is not None:
                ev = op.events[layer] if layer < len(op.events) else None
            else:  # a whole-step store: every layer's event (a hook may repeat one for skipped layers)
                ev = _distinct(op.events)
            kwargs = {"compute_event": ev} if ev is not None else {}
        try:
            op.jobs[part] = self.engine.submit(h, src, dst, pairs, layers, **kwargs)
            op.submitted += 1
        except Exception as exc:  # bad ids, a full queue, a closed engine: the op fails, cleanly
            log.warning("kvsched offload: %s of request %r not submitted: %s", "load" if op.kind == 0 else "store", op.req_id, exc)
            op.settled[part] = True
            h.mark_complete(error=exc)

    def _dispatch_remote(self, h: Any, op: _Op, part: int) -> None:
        """A decided part of a disaggregated operation: wait for the peer's read (producer), or
        read from the peer (consumer; the read's notification ends the producer's operation)."""
        try:
            if op.kind == _SEND_OP:
                op.jobs[part] = self.remote_engine.expect_remote(h, timeout=self.config.remote_timeout)
            elif isinstance(op.remote, BaseException):
                raise op.remote
            else:
                op.jobs[part] = self.remote_engine.submit(h, op.remote, self.gpu_pool, _pairs(op.host, op.gpu))
            op.submitted += 1
        except Exception as exc:  # noqa: BLE001 - a bad pool or ids, a closed engine: the op fails, cleanly
            log.warning("kvsched offload: %s of request %r failed: %s",
                        "peer read" if op.kind == _SEND_OP else "read from the peer", op.req_id, exc)
            op.settled[part] = True
            h.mark_complete(error=exc)

    def _tell_producer(self, pool: Any, op_id: int, reason: str) -> None:
        """Tell the producer of ``pool`` (its RemotePool, or its description) that operation
        ``op_id`` will not be read, so it frees the blocks it keeps for it. Best effort: a
        producer that cannot be told frees them after its ``remote_timeout``."""
        try:
            if isinstance(pool, bytes):
                pool = self._peer_pool(pool)
            self.remote_engine.cancel_remote(pool, _uuid_of(op_id), reason)
        except Exception as exc:  # noqa: BLE001
            log.debug("kvsched offload: could not tell the producer: %s", exc)

    def _settle_layerwise(self, op: _Op, timeout: float = 60.0) -> None:
        for k in range(op.parts):
            if op.jobs[k] is None and not op.cancelled:
                u = _part_id(op.op_id, k)
                if u in self._ops:
                    op.handles[k].wait(timeout)
                    self._dispatch_one(op.handles[k], *self._take(u))
            if op.jobs[k] is not None:
                op.jobs[k].wait(timeout)
        self._end_op(op)

    def _finish_slot(self, slot: str) -> None:
        ops = self._slot_ops.get(slot)
        if ops is None:
            return
        w = self._w
        # No slot_status(): every error the core records for these operations comes from a
        # handle this worker read or marked (a failed copy's job, a failed submit or a cancelled
        # part marked failed here, a CANCEL decision on cancel or timeout), all in _Op. A store
        # batch's slot takes no operation after its step, so its report means it is complete.
        if slot[0] != "\x01" and not w.is_complete(slot):
            # The slot completed, then this step joined new operations into it: end the ones
            # that had ended; take_finished reports the slot again when the rest end.
            keep = []
            for op in ops:
                if all(op.settled[k] or (op.jobs[k] is not None and op.jobs[k].done()) for k in range(op.parts)):
                    self._end_op(op)
                else:
                    keep.append(op)
            self._slot_ops[slot] = keep
            return
        for op in ops:
            self._end_op(op)
        del self._slot_ops[slot]
        w.remove_slot(slot)
        if slot[0] in "\x01\x02":  # a step's store or layerwise-load batch
            for op in ops:
                for spec in op.specs:
                    batches = self._rid_batches.get(spec.req_id)
                    if batches is not None:
                        batches.discard(slot)
            return
        rid = _rid_of(slot)
        slots = self._rid_slots.get(rid)
        if slots is not None:
            slots.discard(slot)
        if self._rid_slot.get(rid) == slot:
            del self._rid_slot[rid]

    def _end_op(self, op: _Op) -> None:
        if op.ended:
            return
        op.ended = True
        ok = not op.cancelled
        if ok:
            for j in op.jobs:
                if j is None or not j.done() or j.error is not None:
                    ok = False
                    break
        results, stats = self._out(), self.stats
        self.stats_changed = True
        add = results.reports.add
        if op.specs:
            for spec in op.specs:
                add(spec.op_id, ok)
        else:
            add(op.op_id, ok)
        if op.kind == _SEND_OP:
            stats["sends_ok" if ok else "sends_failed"] += 1
            return
        load = op.kind == _LOAD_OP
        if load and not op.layerwise:
            results.finished_recving.add(op.req_id)
        if not ok and op.jobs[0] is None and op.remote is not None and not isinstance(op.remote, BaseException):
            # Never posted (cancelled, refused): the producer frees the blocks now, not after
            # its remote_timeout. A posted read tells it by itself (ok, or failed).
            self._tell_producer(op.remote, op.op_id, f"request {op.req_id!r}: read not made")
        count = len(op.specs) or 1
        k_ok, k_failed, k_blocks, k_bytes, k_s = _LOAD_KEYS if load else _STORE_KEYS
        if not ok:
            stats[k_failed] += count
            if load:
                results.failed_blocks.update(op.gpu)
            return
        n = len(op.gpu)
        stats[k_ok] += count
        stats[k_blocks] += n
        stats[k_bytes] += n * self._block_bytes
        seconds = 0.0
        for j in op.jobs:
            seconds += j.seconds or 0.0
        stats[k_s] += seconds

    def take_stats(self) -> dict[str, float]:
        """Counters since the last call (then reset)."""
        out, self.stats = self.stats, _new_stats()
        self.stats_changed = False
        return out

    def close(self, timeout: float | None = 30.0) -> None:
        """Let running copies land, then release the engines and the scheduler."""
        if self.engine is not None:
            self.engine.close(timeout)
        if self.remote_engine is not None:
            self.remote_engine.close(timeout)
        if self.scheduler is not None:
            self.scheduler.close()


_LOAD_KEYS = ("loads_ok", "loads_failed", "blocks_loaded", "bytes_loaded", "load_s")
_STORE_KEYS = ("stores_ok", "stores_failed", "blocks_stored", "bytes_stored", "store_s")


def _part_id(op_id: int, part: int) -> bytes:
    """The kvsched uuid of part ``part`` of operation ``op_id`` (``plan.layer_uuid``), as the 16
    bytes the core takes (cheaper to make than a ``uuid.UUID``)."""
    return (op_id | part).to_bytes(16, "big")


def _uuid_of(op_id: int) -> uuid.UUID:
    """Operation ``op_id``'s (whole-operation) uuid as a ``uuid.UUID``."""
    return uuid.UUID(int=op_id)


def _pairs(src: list[int], dst: list[int]) -> Any:
    """(source, destination) block pairs for ``TransferEngine.submit``: a list of tuples for a
    few (checked in plain Python, no numpy call), an (N, 2) array for many."""
    if len(src) <= _FEW_PAIRS:
        return list(zip(src, dst))
    return np.array([src, dst], dtype=np.int64).T


def _distinct(events: list[Any]) -> Any:
    """The events of ``events`` that are not None, each once: None, one event, or a list."""
    out: list[Any] = []
    for ev in events:
        if ev is not None and not any(ev is seen for seen in out):
            out.append(ev)
    return None if not out else out[0] if len(out) == 1 else out


def _rid_of(slot: str) -> str:
    return slot.split("\x00", 1)[0]


def _new_stats() -> dict[str, float]:
    return {"loads": 0, "stores": 0, "loads_ok": 0, "loads_failed": 0, "stores_ok": 0, "stores_failed": 0,
            "blocks_loaded": 0, "blocks_stored": 0, "bytes_loaded": 0, "bytes_stored": 0,
            "load_s": 0.0, "store_s": 0.0, "preemptions": 0, "sends": 0, "sends_ok": 0, "sends_failed": 0}
