"""``OffloadWorker``: the worker side of a host tier (one per GPU process).

It owns a kvsched :class:`~kvsched.Scheduler`, a :class:`~kvsched.TransferEngine` and the host
pool, and runs each step's :class:`StepPlan`. Every load and store is a kvsched operation joined
from both halves: the worker half (``enqueue`` into the request's slot) and the transfer half
(``schedule`` with the operation's requirement). Decided handles (their ``decision`` read at each hook) are
submitted to the engine, which marks them when the bytes have landed; ended requests come
from ``worker.take_finished``, never from polling every request.

Calls per engine step, in the order an engine's model runner makes them::

    begin_step(plan)          # new iteration; cancel/fence preempted and aborted requests;
                              # stores: one operation per layer for all of the step's stores
                              # (the step's own slot), layer k gated on LayerComplete(k, it)
    start_loads(event)        # loads: joined now, no requirement (before the forward pass in
                              # layerwise mode, after it in async mode)
    wait_layer_load(k, stream)  # layerwise: layer k waits for its blocks (GPU: the stream
                              # waits on the copy's event; host backend: the CPU waits)
    layer_done(k, event)      # layer k's KV is written: mark it, submit its stores (GPU: the
                              # copy stream waits for ``event``; the caller never waits)
    end_step()                # mark the iteration complete (layers an engine skipped too)
    collect(finished) -> StepResults   # ended requests, failed blocks, per-op reports

Stores of one step share their per-layer operations: a layer's copy is one transfer job for
every request that stores in that step (one submit per layer and step). A request's stores
are reported, and the request released, when every step batch holding them ended. Stores are
never cancelled (a batch is shared; it runs within the step's forward pass anyway): an aborted
request waits for them to drain, a preempted one is fenced until they ended. Loads are per
request in async mode (one operation in the request's slot, cancelled on abort or preemption)
and, in layerwise mode, shared per layer by the step's loads like stores (they run within the
step; layer k's forward waits for layer k's job).

Layer marks follow kvsched's S7 (each the next index); a hook that skips layers is covered by
marking the ones in between, and ``end_step`` marks the whole iteration (S2).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from kvsched.errors import InvalidArgumentError, KvschedError
from kvsched.offload.config import OffloadConfig
from kvsched.offload.plan import LoadSpec, OpReports, StepPlan, StoreSpec, layer_uuid
from kvsched.pool import BlockPool
from kvsched.protocol import Decision, LayerComplete, TransferKind

__all__ = ["OffloadWorker", "StepResults"]

log = logging.getLogger("kvsched")

_EXECUTE = Decision.EXECUTE


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


class _Op:
    __slots__ = ("op_id", "kind", "req_id", "slot", "gpu", "host", "layers", "parts", "handles", "jobs",
                 "settled", "cancelled", "ended", "layerwise", "events", "submitted", "t0", "specs")

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
        self.t0 = time.perf_counter()
        self.specs: list[Any] = []  # a batch: the requests' StoreSpecs (or layerwise LoadSpecs) it carries


class OffloadWorker:
    """Worker side of a host tier. ``OffloadWorker(config, world_size=1, rank=0)``, then
    :meth:`register` with the GPU pool. ``engine_options`` go to the TransferEngine (tests:
    ``fault_hook``)."""

    def __init__(self, config: OffloadConfig, *, world_size: int = 1, rank: int = 0,
                 engine_options: dict[str, Any] | None = None) -> None:
        self.config = config
        self.world_size = world_size
        self.rank = rank
        self._engine_options = dict(engine_options or {})
        self.scheduler: Any = None
        self.engine: Any = None
        self.gpu_pool: BlockPool | None = None
        self.host_pool: BlockPool | None = None
        self.host_blocks = 0
        self.num_layers = 0
        self._host_owner: Any = None
        self._iteration = 0
        self._next_layer = 0
        self._in_iteration = False
        self._events: list[Any] = []
        self._ops: dict[Any, tuple[_Op, int]] = {}  # part uuid -> (op, part index), until dispatched
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
        self._results = StepResults()
        self.stats = _new_stats()
        self.cpu_s = 0.0

    # ------------------------------------------------------------------------------ setup

    def register(self, gpu_pool: BlockPool, host_pool: BlockPool | None = None) -> None:
        """Build the scheduler, the engine and (unless given) the host pool for ``gpu_pool``.
        The host pool holds ``host_bytes / world_size`` bytes of whole blocks: page-locked
        (torch ``pin_memory``) when the GPU pool is on a GPU, plain numpy memory otherwise."""
        from kvsched import Scheduler, TransferEngine

        self.gpu_pool = gpu_pool
        self.num_layers = gpu_pool.num_layers
        self.host_blocks = self.config.num_host_blocks(gpu_pool.block_bytes * gpu_pool.num_layers, self.world_size)
        if host_pool is None:
            host_pool = self._make_host_pool(gpu_pool, self.host_blocks)
        elif not host_pool.same_geometry(gpu_pool) or host_pool.num_layers != gpu_pool.num_layers:
            raise InvalidArgumentError(f"host pool {host_pool} does not match the GPU pool {gpu_pool}")
        self.host_pool = host_pool
        self.scheduler = Scheduler(
            max_inflight=self.config.max_inflight, op_timeout=self.config.op_timeout, num_layers=self.num_layers,
        )
        self.engine = TransferEngine(self.scheduler, backend=self.config.backend, **self._engine_options)
        log.info("kvsched offload worker %d/%d: %d host blocks of %d bytes x %d layers, backend %s",
                 self.rank, self.world_size, self.host_blocks, gpu_pool.block_bytes, self.num_layers,
                 self.engine.backend)

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

    def begin_step(self, plan: StepPlan | None) -> int:
        """Start an iteration and take the plan's cancellations and stores (loads wait for
        :meth:`start_loads`). Returns the kvsched iteration number."""
        t0 = time.thread_time()
        self._require_registered()
        w, t = self.scheduler.worker, self.scheduler.transfer
        if self._in_iteration:  # the previous step's hooks never ended it
            self._end_iteration()
        if self._step_loads:  # an engine that skipped start_load_kv: join them now, never drop one
            self.start_loads()
        self._iteration = w.start_next_iteration()
        self._in_iteration = True
        self._next_layer = 0
        self._events = []
        self._layer_loads = []
        if plan is not None:
            if plan.host_blocks and plan.host_blocks != self.host_blocks:
                raise InvalidArgumentError(
                    f"the scheduler side plans for {plan.host_blocks} host blocks, this worker has "
                    f"{self.host_blocks}: both must derive the capacity from the same host_bytes and block size"
                )
            if self._fenced is not plan:
                self.fence_preempted(plan)
            self._fenced = None
            for rid in plan.aborted:
                self._cancel_request(rid, fence=False, new_generation=False)
            if plan.stores:
                self._join_stores(plan.stores)
            self._step_loads = list(plan.loads)
            for rid in plan.release:
                self._release.add(rid)
                self._finished_rids.add(rid)
        self.cpu_s += time.thread_time() - t0
        return self._iteration

    def fence_preempted(self, plan: StepPlan | None) -> None:
        """The plan's preempted requests: cancel their loads that have not started and wait
        until no copy touches their GPU blocks. Call it before the engine reuses those blocks
        (vLLM: ``handle_preemptions``, before it zeroes new blocks); ``begin_step`` calls it
        for a plan that did not get it."""
        if plan is None or not plan.preempted:
            return
        t0 = time.thread_time()
        self._require_registered()
        for rid in plan.preempted:
            self._cancel_request(rid, fence=True, new_generation=True)
        self._fenced = plan
        self.cpu_s += time.thread_time() - t0

    def _join_stores(self, specs: list[StoreSpec]) -> None:
        """This step's stores, all requests together: one kvsched operation per layer in the
        step's own slot, layer k gated on ``LayerComplete(k, iteration)``. A layer's copy is
        then one transfer job for every request (one submit per layer, not per layer and
        request); each request's store is reported when all layers of its step ended."""
        w, t, it, L = self.scheduler.worker, self.scheduler.transfer, self._iteration, self.num_layers
        slot = f"\x01step{it}"
        w.create_slot(slot)
        self._slot_ops[slot] = []
        gpu = [b for spec in specs for b in spec.gpu_blocks]
        host = [b for spec in specs for b in spec.host_blocks]
        op_id = specs[0].op_id  # the batch's kvsched uuids derive from its first store's id
        op = _Op(op_id, 1, slot, slot, gpu, host, list(range(L)), False, self._events)
        op.specs = list(specs)
        uuids = [layer_uuid(op_id, k) for k in range(L)]
        w.enqueue_many(slot, uuids, TransferKind.STORE)
        self._slot_ops[slot].append(op)
        for k, u in enumerate(uuids):
            op.handles[k] = t.schedule(slot, u, LayerComplete(k, it))
            self._ops[u] = (op, k)
        for spec in specs:
            self._rid_batches.setdefault(spec.req_id, set()).add(slot)
        self.stats["stores"] += len(specs)

    def _fence(self, ops: Iterable[_Op], timeout: float = 60.0) -> None:
        """Wait until no copy of ``ops`` touches their blocks any more: undecided parts are waited
        for and submitted (or cancelled), running copies waited for."""
        self._dispatch()
        for op in ops:
            for k in range(op.parts):
                if op.jobs[k] is None and not op.settled[k]:
                    u = layer_uuid(op.op_id, k)
                    if u in self._ops:
                        op.handles[k].wait(timeout)
                        self._dispatch_one(op.handles[k], *self._ops.pop(u))
                job = op.jobs[k]
                if job is not None and not job.done():
                    job.wait(timeout)

    def start_loads(self, wait_event: Any = None) -> None:
        """Join this step's loads (no requirement: each runs when a token is free, loads before
        stores). ``wait_event``: the compute stream's event the copies wait for (GPU: the last
        reads of reused blocks)."""
        if not self._step_loads:
            return
        t0 = time.thread_time()
        w, t, L = self.scheduler.worker, self.scheduler.transfer, self.num_layers
        loads, self._step_loads = self._step_loads, []
        events = [wait_event] if wait_event is not None else None
        layerwise = [spec for spec in loads if spec.layerwise]
        if layerwise:  # one operation per layer for all of them, in the step's load slot
            slot = f"\x02load{self._iteration}"
            if slot not in self._slot_ops:
                w.create_slot(slot)
                self._slot_ops[slot] = []
            op = _Op(layerwise[0].op_id, 0, slot, slot, [b for sp in layerwise for b in sp.gpu_blocks],
                     [b for sp in layerwise for b in sp.host_blocks], list(range(L)), True, events)
            op.specs = layerwise
            uuids = [layer_uuid(op.op_id, k) for k in range(L)]
            w.enqueue_many(slot, uuids, TransferKind.LOAD)
            self._slot_ops[slot].append(op)
            for k, h in enumerate(t.schedule_many(slot, uuids)):
                op.handles[k] = h
                self._ops[uuids[k]] = (op, k)
            self._layer_loads.append(op)
            for sp in layerwise:
                self._rid_batches.setdefault(sp.req_id, set()).add(slot)
            self.stats["loads"] += len(layerwise)
        for spec in loads:
            if spec.layerwise:
                continue
            slot = self._slot(spec.req_id)
            op = _Op(spec.op_id, 0, spec.req_id, slot, spec.gpu_blocks, spec.host_blocks, [None], False, events)
            u = layer_uuid(spec.op_id, 0)
            w.enqueue(slot, u, TransferKind.LOAD)
            self._slot_ops[slot].append(op)
            op.handles[0] = t.schedule(slot, u)
            self._ops[u] = (op, 0)
            self.stats["loads"] += 1
        self._dispatch()
        self.cpu_s += time.thread_time() - t0

    def wait_layer_load(self, layer: int, stream: Any = None, timeout: float = 60.0) -> None:
        """Layerwise mode: layer ``layer`` of this step's loads has landed before the layer
        reads it. GPU: ``stream`` waits on the copy's event (no CPU wait); host backend (or no
        stream): the CPU waits for the copy."""
        if not self._layer_loads:
            return
        t0 = time.thread_time()
        for op in self._layer_loads:
            job = op.jobs[layer]
            if job is None and not op.cancelled:
                self._dispatch()
                job = op.jobs[layer]
                h = op.handles[layer]
                if job is None and h is not None and (u := layer_uuid(op.op_id, layer)) in self._ops:
                    h.wait(timeout)  # a token is not free yet: loads go first, so this is short
                    self._dispatch_one(h, *self._ops.pop(u))
                    job = op.jobs[layer]
            if job is None:
                continue  # cancelled: reported as failed blocks at collect()
            if stream is not None and self.engine.backend == "cuda" and job.kind == "h2d":
                job.wait_on(stream)
            else:
                job.wait(timeout)
        self.cpu_s += time.thread_time() - t0

    def layer_done(self, layer: int, compute_event: Any = None) -> None:
        """Layer ``layer``'s KV of this step is written. Marks it (and any layers an engine hook
        skipped before it) and submits the stores it released; on a GPU ``compute_event`` (the
        compute stream's event after the layer) is what their copies wait for."""
        if not self._in_iteration or layer < self._next_layer:
            return
        t0 = time.thread_time()
        w = self.scheduler.worker
        while len(self._events) < layer:
            self._events.append(compute_event)
        self._events.append(compute_event)
        while self._next_layer <= layer:
            w.mark_layer_complete(self._next_layer)
            self._next_layer += 1
        self._dispatch()
        self.cpu_s += time.thread_time() - t0

    def end_step(self) -> None:
        """The forward pass ended: every layer of this iteration is complete."""
        if self._in_iteration:
            t0 = time.thread_time()
            self._end_iteration()
            self._dispatch()
            self.cpu_s += time.thread_time() - t0

    def collect(self, finished_req_ids: Iterable[str] = ()) -> StepResults:
        """Outcomes since the last call: see :class:`StepResults`. ``finished_req_ids``: the
        requests the engine finished this step (their slots are removed once drained)."""
        t0 = time.thread_time()
        self._require_registered()
        self._dispatch()
        w = self.scheduler.worker
        self._finished_rids.update(finished_req_ids)
        # Layerwise loads end within their step (each layer waited for its part): their
        # outcome is reported now, not when the request's slot drains (vLLM wants a failed
        # synchronous load in the step that ran it).
        for op in self._layer_loads:
            self._settle_layerwise(op)
        self._layer_loads = []
        for slot in w.take_finished():
            self._finish_slot(slot)
        done_rids = [rid for rid in self._finished_rids
                     if not self._rid_slots.get(rid) and not self._rid_batches.get(rid)]
        for rid in done_rids:
            self._finished_rids.discard(rid)
            self._rid_slot.pop(rid, None)
            self._rid_slots.pop(rid, None)
            self._rid_batches.pop(rid, None)
            self._generation.pop(rid, None)
            self._cancelled_rids.discard(rid)
            if rid in self._release:
                self._release.discard(rid)
                self._results.finished_sending.add(rid)
        results, self._results = self._results, StepResults()
        self.cpu_s += time.thread_time() - t0
        return results

    # ------------------------------------------------------------------------------ internals

    def _require_registered(self) -> None:
        if self.scheduler is None:
            raise KvschedError("OffloadWorker.register() must be called before the first step")

    def _end_iteration(self) -> None:
        self.scheduler.worker.mark_iteration_complete()
        self._in_iteration = False

    def _slot(self, rid: str) -> str:
        slot = self._rid_slot.get(rid)
        if slot is None:
            gen = self._generation.get(rid, 0)
            slot = rid if gen == 0 else f"{rid}\x00{gen}"
            self.scheduler.worker.create_slot(slot)
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
        w = self.scheduler.worker
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
        if new_generation:
            self._rid_slot.pop(rid, None)
            self._generation[rid] = self._generation.get(rid, 0) + 1

    def _dispatch(self) -> None:
        """Submit the joined operations that kvsched has decided since the last call.

        Reads each undelivered handle's ``decision`` (about 0.3 us) rather than calling
        ``transfer.poll``, which costs about 20 us of CPU (80 us wall) per call even when empty;
        the undelivered handles are the few of the steps in flight."""
        ops = self._ops
        if not ops:
            return
        ready = [(u, entry) for u, entry in ops.items() if entry[0].handles[entry[1]].decision is not None]
        for u, (op, part) in ready:
            del ops[u]
            self._dispatch_one(op.handles[part], op, part)

    def _dispatch_one(self, h: Any, op: _Op, part: int) -> None:
        if h.decision != _EXECUTE:
            op.cancelled = True
            op.settled[part] = True
            return
        if op.cancelled:
            op.settled[part] = True
            h.mark_complete(error=f"request {op.req_id!r} was cancelled before its copy started")
            return
        layer = op.layers[part]
        layers = None if layer is None else [layer]
        if op.kind == 0:
            src, dst, pairs = self.host_pool, self.gpu_pool, np.array([op.host, op.gpu], dtype=np.int64).T
            kwargs = {"wait_event": op.events[0]} if op.events else {}
        else:
            src, dst, pairs = self.gpu_pool, self.host_pool, np.array([op.gpu, op.host], dtype=np.int64).T
            ev = op.events[layer] if op.events is not None and layer is not None and layer < len(op.events) else None
            kwargs = {"compute_event": ev} if ev is not None else {}
        try:
            op.jobs[part] = self.engine.submit(h, src, dst, pairs, layers, **kwargs)
            op.submitted += 1
        except Exception as exc:  # bad ids, a full queue, a closed engine: the op fails, cleanly
            log.warning("kvsched offload: %s of request %r not submitted: %s", "load" if op.kind == 0 else "store", op.req_id, exc)
            op.settled[part] = True
            h.mark_complete(error=exc)

    def _settle_layerwise(self, op: _Op, timeout: float = 60.0) -> None:
        for k in range(op.parts):
            if op.jobs[k] is None and not op.cancelled:
                u = layer_uuid(op.op_id, k)
                if u in self._ops:
                    op.handles[k].wait(timeout)
                    self._dispatch_one(op.handles[k], *self._ops.pop(u))
            if op.jobs[k] is not None:
                op.jobs[k].wait(timeout)
        self._end_op(op, ())

    def _finish_slot(self, slot: str) -> None:
        ops = self._slot_ops.get(slot)
        if ops is None:
            return
        w = self.scheduler.worker
        status = w.slot_status(slot)
        failed_uuids = {u for u, _ in status.errors} if status.errors else ()
        if not w.is_complete(slot):
            # The slot completed, then this step joined new operations into it: end the ones
            # that had ended; take_finished reports the slot again when the rest end.
            keep = []
            for op in ops:
                if all(op.settled[k] or (op.jobs[k] is not None and op.jobs[k].done()) for k in range(op.parts)):
                    self._end_op(op, failed_uuids)
                else:
                    keep.append(op)
            self._slot_ops[slot] = keep
            return
        for op in ops:
            self._end_op(op, failed_uuids)
        del self._slot_ops[slot]
        self.scheduler.worker.remove_slot(slot)
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

    def _end_op(self, op: _Op, failed_uuids: Any) -> None:
        if op.ended:
            return
        op.ended = True
        ok = not op.cancelled and all(j is not None and j.done() and j.error is None for j in op.jobs)
        if ok and failed_uuids:
            ok = not any(layer_uuid(op.op_id, k) in failed_uuids for k in range(op.parts))
        results, stats = self._results, self.stats
        if op.specs:
            for spec in op.specs:
                results.reports.add(spec.op_id, ok)
        else:
            results.reports.add(op.op_id, ok)
        kind = "load" if op.kind == 0 else "store"
        if op.kind == 0 and not op.layerwise:
            results.finished_recving.add(op.req_id)
        count = len(op.specs) or 1
        if not ok:
            stats[kind + "s_failed"] += count
            if op.kind == 0:
                results.failed_blocks.update(op.gpu)
            return
        n = len(op.gpu)
        stats[kind + "s_ok"] += count
        done = "loaded" if op.kind == 0 else "stored"
        stats["blocks_" + done] += n
        stats["bytes_" + done] += n * self.gpu_pool.block_bytes * self.num_layers
        stats[kind + "_s"] += sum(j.seconds or 0.0 for j in op.jobs)

    def take_stats(self) -> dict[str, float]:
        """Counters since the last call (then reset)."""
        out, self.stats = self.stats, _new_stats()
        return out

    def close(self, timeout: float | None = 30.0) -> None:
        """Let running copies land, then release the engine and the scheduler."""
        if self.engine is not None:
            self.engine.close(timeout)
        if self.scheduler is not None:
            self.scheduler.close()


def _rid_of(slot: str) -> str:
    return slot.split("\x00", 1)[0]


def _new_stats() -> dict[str, float]:
    return {"loads": 0, "stores": 0, "loads_ok": 0, "loads_failed": 0, "stores_ok": 0, "stores_failed": 0,
            "blocks_loaded": 0, "blocks_stored": 0, "bytes_loaded": 0, "bytes_stored": 0,
            "load_s": 0.0, "store_s": 0.0, "preemptions": 0}
