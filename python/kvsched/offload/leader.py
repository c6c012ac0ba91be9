"""``OffloadLeader``: the scheduler side of a host tier, independent of any serving engine.

Per engine step the engine's scheduler asks it three things, in this order:

1. :meth:`lookup`: how many tokens beyond the ones computed locally the tier can supply (the
   longest prefix of READY blocks, leaving at least one token to compute);
2. :meth:`plan_load`: once GPU blocks are allocated for those tokens, pin the tier entries
   and plan the load;
3. :meth:`plan_stores`: for each scheduled request, the blocks that become full in this step
   and are not in the tier yet get a host slot and a store;

then :meth:`take_plan` returns the step's :class:`StepPlan` for the workers. The workers'
:class:`OpReports` come back through :meth:`on_reports`: an operation has ended when every
worker reported it; a completed store makes its entries hits, a failed one drops them; a
failed load drops the entries it read, so a request that recomputes is not offered them again.

:meth:`finished` says whether the engine must keep a finished request's GPU blocks (stores of
it still running) and :meth:`preempted` records a preemption. Not thread-safe: one scheduler
thread calls it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from kvsched.errors import InvalidArgumentError
from kvsched.offload.plan import LoadSpec, OpReports, RecvSpec, SendSpec, StepPlan, StoreSpec, new_op_id
from kvsched.offload.tier import HostTier

log = logging.getLogger("kvsched")

__all__ = ["OffloadLeader", "REMOTE_PARAMS_KEY", "check_remote_params"]

_LOAD, _STORE, _SEND, _RECV = 0, 1, 2, 3
_LAYER_MASK = (1 << 16) - 1

#: The key of kvsched's part in a request's ``kv_transfer_params`` (disaggregated serving).
REMOTE_PARAMS_KEY = "kvsched"
_PARAMS_VERSION = 1
_RECV_SEEN = 1 << 16  # operation ids a consumer remembers having read


@dataclass
class _Op:
    kind: int
    req_id: str
    keys: list[bytes]
    reports: int = 0
    failed: int = 0


@dataclass
class _Request:
    lookup_start: int = 0  # block index the last lookup started from
    store_cursor: int | None = None  # blocks below this were considered for storing (None: none yet)
    ops: set[int] = field(default_factory=set)  # operations not yet reported by every worker
    async_load: int | None = None  # the async load in flight, if any
    finished: bool = False
    used: dict[int, bytes] = field(default_factory=dict)  # block position -> key it loaded or stored


class OffloadLeader:
    """Scheduler side of one host tier of ``capacity`` blocks of ``block_size`` tokens.

    ``layerwise``: loads run during the forward pass (``lookup`` callers report them as
    synchronous); else asynchronous, between steps. ``world_size``: workers that report each
    operation."""

    def __init__(self, capacity: int, block_size: int, *, layerwise: bool = False, world_size: int = 1) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise InvalidArgumentError(f"block_size must be an int >= 1, got {block_size!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise InvalidArgumentError(f"world_size must be an int >= 1, got {world_size!r}")
        self.tier = HostTier(capacity)
        self.block_size = block_size
        self.layerwise = bool(layerwise)
        self.world_size = world_size
        self._reqs: dict[str, _Request] = {}
        self._ops: dict[int, _Op] = {}
        self._plan = StepPlan(host_blocks=capacity)
        self.stats = {
            "lookups": 0, "lookups_deferred": 0, "lookup_tokens": 0, "hit_tokens": 0,
            "loads_planned": 0, "stores_planned": 0, "blocks_load_planned": 0, "blocks_store_planned": 0,
            "loads_ok": 0, "loads_failed": 0, "stores_ok": 0, "stores_failed": 0, "stores_skipped_full": 0,
            "sends_planned": 0, "sends_ok": 0, "sends_failed": 0, "sends_unavailable": 0,
            "recvs_planned": 0, "recvs_ok": 0, "recvs_failed": 0, "recvs_refused": 0, "recvs_cancelled": 0,
        }
        # Disaggregated serving, producer: each worker's GPU pool description (rank -> bytes,
        # OffloadWorker.pool_description), handed to consumers with each finished request.
        self.exports: dict[int, bytes] = {}
        # Consumer: operation ids already read (bounded). Parameters replayed after the first read
        # would read blocks the producer may have given to another request by then.
        self._recv_seen: OrderedDict[int, None] = OrderedDict()
        self.cpu_s = 0.0  # host CPU time spent in this object's calls (thread time)

    # ------------------------------------------------------------------------------ queries

    def has_request(self, req_id: str) -> bool:
        return req_id in self._reqs

    def pending_ops(self, req_id: str | None = None) -> int:
        if req_id is None:
            return len(self._ops)
        r = self._reqs.get(req_id)
        return 0 if r is None else len(r.ops)

    # ------------------------------------------------------------------------------ lookups

    def lookup(self, req_id: str, block_hashes: Sequence[bytes], num_computed_tokens: int, num_tokens: int) -> int | None:
        """Tokens beyond ``num_computed_tokens`` (block aligned) the tier can supply: the
        longest run of READY blocks from there, stopping one token short of ``num_tokens``
        (the engine computes at least the last token). None when the block after that run is
        being stored (another request computed it; ask again once the store has ended rather
        than compute it again); blocks are never offered before their store completed."""
        t0 = time.thread_time()
        bs = self.block_size
        start = num_computed_tokens // bs
        limit = max(num_tokens - 1, 0) // bs
        r = self._reqs.get(req_id)
        if r is None:
            r = self._reqs[req_id] = _Request()
        r.lookup_start = start
        hits = self.tier.count_hits(block_hashes, start, limit) if limit > start else 0
        if start + hits < limit and self.tier.is_storing(bytes(block_hashes[start + hits])):
            self.stats["lookups_deferred"] += 1
            self.cpu_s += time.thread_time() - t0
            return None
        self.stats["lookups"] += 1
        self.stats["lookup_tokens"] += max(num_tokens - num_computed_tokens, 0)
        self.cpu_s += time.thread_time() - t0
        return hits * bs

    def plan_load(self, req_id: str, block_hashes: Sequence[bytes], gpu_block_ids: Sequence[int], num_external_tokens: int) -> LoadSpec | None:
        """Plan the load of the ``num_external_tokens`` that :meth:`lookup` offered, into the
        request's GPU blocks (``gpu_block_ids``: all of its blocks, in token order)."""
        if num_external_tokens <= 0:
            return None
        t0 = time.thread_time()
        r = self._reqs.setdefault(req_id, _Request())
        bs = self.block_size
        if num_external_tokens % bs:
            raise InvalidArgumentError(
                f"request {req_id!r}: {num_external_tokens} external tokens are not whole blocks of {bs}"
            )
        start, n = r.lookup_start, num_external_tokens // bs
        keys = [bytes(h) for h in block_hashes[start : start + n]]
        gpu = [int(b) for b in gpu_block_ids[start : start + n]]
        if len(keys) != n or len(gpu) != n:
            raise InvalidArgumentError(
                f"request {req_id!r}: load of blocks {start}..{start + n} but it has "
                f"{len(block_hashes)} hashes and {len(gpu_block_ids)} GPU blocks"
            )
        host = self.tier.pin_for_load(keys, req_id, start)
        r.used.update(zip(range(start, start + n), keys))
        op_id = new_op_id()
        self._ops[op_id] = _Op(_LOAD, req_id, keys)
        r.ops.add(op_id)
        if not self.layerwise:
            r.async_load = op_id
        r.store_cursor = max(r.store_cursor or 0, start + n)
        spec = LoadSpec(op_id, req_id, gpu, host, self.layerwise)
        self._plan.loads.append(spec)
        self.stats["loads_planned"] += 1
        self.stats["blocks_load_planned"] += n
        self.stats["hit_tokens"] += num_external_tokens
        self.cpu_s += time.thread_time() - t0
        return spec

    # ------------------------------------------------------------------------------ stores

    def plan_stores(self, req_id: str, block_hashes: Sequence[bytes], gpu_block_ids: Sequence[int], first_block: int, end_block: int) -> StoreSpec | None:
        """Plan stores of blocks ``[first_block, end_block)`` (those that became full in this
        step) that the tier does not hold yet. Blocks without a hash or a GPU block are skipped;
        when every host slot is pinned the rest of the range is skipped (counted)."""
        t0 = time.thread_time()
        r = self._reqs.setdefault(req_id, _Request())
        # From where the last plan stopped: a block whose hash came late (its last token was
        # sampled after the step that computed it) is still stored. The first plan of a request
        # (or after a preemption) starts at first_block: blocks computed before, such as local
        # prefix-cache hits, are not this request's to store.
        begin = first_block if r.store_cursor is None else r.store_cursor
        end = min(end_block, len(block_hashes), len(gpu_block_ids))
        gpu: list[int] = []
        host: list[int] = []
        keys: list[bytes] = []
        tier = self.tier
        for i in range(begin, end):
            key = bytes(block_hashes[i])
            if key in tier:
                if tier.is_ready(key):  # the request reuses a stored block: it counts as used
                    tier.access(req_id, [key], i)
                    r.used[i] = key
                continue
            slot = tier.reserve_store(key, req_id, i)
            if slot is None:  # every slot is pinned by a transfer: try again in a later step
                self.stats["stores_skipped_full"] += end - i
                break
            keys.append(key)
            gpu.append(int(gpu_block_ids[i]))
            host.append(slot)
            r.used[i] = key
        r.store_cursor = max(begin, end)
        spec = None
        if keys:
            op_id = new_op_id()
            self._ops[op_id] = _Op(_STORE, req_id, keys)
            r.ops.add(op_id)
            spec = StoreSpec(op_id, req_id, gpu, host)
            self._plan.stores.append(spec)
            self.stats["stores_planned"] += 1
            self.stats["blocks_store_planned"] += len(keys)
        self.cpu_s += time.thread_time() - t0
        return spec

    # ------------------------------------------------------------------------------ disaggregation

    def plan_send(self, req_id: str, gpu_block_ids: Sequence[int]) -> dict | None:
        """Producer side: the finished request ``req_id``'s blocks will be read by a peer. Plans
        the workers' wait for the peer's read (an operation the peer's read notification ends)
        and returns what the peer needs, to go in the request's transfer parameters (plain JSON
        types: ``{"v", "op_id", "block_ids", "pools"}``), or None when :attr:`exports` lacks a
        worker's pool. Call it before :meth:`finished`, which then keeps the blocks until the
        wait ended."""
        if any(rank not in self.exports for rank in range(self.world_size)):
            self.stats["sends_unavailable"] += 1
            return None
        r = self._reqs.setdefault(req_id, _Request())
        gpu = [int(b) for b in gpu_block_ids]
        op_id = new_op_id()
        self._ops[op_id] = _Op(_SEND, req_id, [])
        r.ops.add(op_id)
        self._plan.sends.append(SendSpec(op_id, req_id, gpu))
        self.stats["sends_planned"] += 1
        return {
            "v": _PARAMS_VERSION,
            "op_id": f"{op_id:032x}",
            "block_ids": gpu,
            "pools": [base64.b64encode(self.exports[rank]).decode("ascii") for rank in range(self.world_size)],
        }

    def plan_recv(self, req_id: str, params: Any, gpu_block_ids: Sequence[int], num_computed_tokens: int,
                  num_external_tokens: int) -> RecvSpec:
        """Consumer side: read the ``num_external_tokens`` after ``num_computed_tokens`` from the
        producer that sent ``params`` (:meth:`plan_send`'s value, which came over the network:
        checked as untrusted input) into the request's GPU blocks ``gpu_block_ids`` (all of
        them, in token order). The engine waits for the read as for an asynchronous load.
        Parameters that do not fit (checked with :func:`check_remote_params` before the engine
        counted the tokens as external, so this is rare) plan a read that fails at once: its
        blocks are reported failed and the engine computes them itself."""
        bs = self.block_size
        start = num_computed_tokens // bs
        end = -(-(num_computed_tokens + num_external_tokens) // bs)
        try:
            remote_ids, op_id, pools = check_remote_params(params, self.world_size)
            if num_computed_tokens % bs or end > len(remote_ids) or end > len(gpu_block_ids) or end <= start:
                raise InvalidArgumentError(
                    f"tokens {num_computed_tokens}..{num_computed_tokens + num_external_tokens} do not fit the "
                    f"producer's {len(remote_ids)} blocks and {len(gpu_block_ids)} local blocks"
                )
            if not self._first_use(op_id):
                raise InvalidArgumentError(f"operation {op_id:032x} was already read here (parameters replayed?)")
        except InvalidArgumentError as exc:
            log.warning("kvsched: request %r: read from the producer refused, recomputing: %s", req_id, exc)
            self.stats["recvs_refused"] += 1
            remote_ids, op_id, pools = [], new_op_id(), []  # no pool for any rank: fails on every worker
        r = self._reqs.setdefault(req_id, _Request())
        self._ops[op_id] = _Op(_RECV, req_id, [])
        r.ops.add(op_id)
        r.async_load = op_id
        gpu = [int(b) for b in gpu_block_ids[start:end]]
        spec = RecvSpec(op_id, req_id, gpu, remote_ids[start:end] if remote_ids else [0] * len(gpu), pools)
        self._plan.recvs.append(spec)
        self.stats["recvs_planned"] += 1
        return spec

    def cancel_recv(self, req_id: str, params: Any) -> RecvSpec | None:
        """Consumer side: the request ended before its read was planned (aborted while it
        waited): the workers tell the producer, which frees the blocks it kept now rather than
        after its ``remote_timeout``. Parameters that fail the checks are ignored (None)."""
        try:
            _, op_id, pools = check_remote_params(params, self.world_size)
        except InvalidArgumentError:
            return None
        if not self._first_use(op_id):
            return None  # planned already: the worker's read (or its cancellation) tells the producer
        spec = RecvSpec(op_id, req_id, [], [], pools, cancel=True)
        self._plan.recvs.append(spec)
        self.stats["recvs_cancelled"] += 1
        return spec

    def _first_use(self, op_id: int) -> bool:
        """Consumer: True the first time ``op_id`` (a producer's operation) is read or cancelled
        here, remembering it (the last ``_RECV_SEEN`` ids)."""
        if op_id in self._ops or op_id in self._recv_seen:
            return False
        self._recv_seen[op_id] = None
        if len(self._recv_seen) > _RECV_SEEN:
            self._recv_seen.popitem(last=False)
        return True

    # ------------------------------------------------------------------------------ lifecycle

    def preempted(self, req_id: str) -> None:
        """The engine freed the request's GPU blocks: workers cancel its undecided operations
        and fence the running ones before the blocks are reused."""
        r = self._reqs.get(req_id)
        if r is not None:
            r.store_cursor = None
            if r.ops:
                self._plan.preempted.append(req_id)

    def finished(self, req_id: str, aborted: bool = False) -> bool:
        """The request finished (or was aborted). True: keep its GPU blocks until a worker
        report names it in :attr:`StepPlan.release` (its stores are still running). A request
        waiting for an asynchronous load returns False: the engine waits for that load itself."""
        r = self._reqs.get(req_id)
        if r is None:
            return False
        r.finished = True
        if r.used:
            self.tier.finish_request(req_id, [r.used[i] for i in sorted(r.used)])
            r.used.clear()
        if aborted and r.ops:
            self._plan.aborted.append(req_id)
        if not r.ops:
            del self._reqs[req_id]
            return False
        if r.async_load is not None:
            return False
        self._plan.release.append(req_id)
        return True

    def take_plan(self) -> StepPlan:
        plan, self._plan = self._plan, StepPlan(host_blocks=self.tier.capacity)
        return plan

    # ------------------------------------------------------------------------------ reports

    def on_reports(self, reports: OpReports | None) -> list[tuple[str, int, bool]]:
        """Count the workers' reports; returns ``(req_id, kind, ok)`` for operations that
        ended on every worker (kind 0 = load, 1 = store, 2 = a peer's read of this instance's
        blocks, 3 = a read from a peer)."""
        if not reports:
            return []
        t0 = time.thread_time()
        ended = []
        for op_id, (n, failed) in reports.ops.items():
            op = self._ops.get(op_id)
            if op is None:
                continue
            op.reports += n
            op.failed += failed
            if op.reports < self.world_size:
                continue
            del self._ops[op_id]
            ok = op.failed == 0
            if op.kind == _LOAD:
                self.tier.end_load(op.keys, ok)
                self.stats["loads_ok" if ok else "loads_failed"] += 1
            elif op.kind == _SEND:
                self.stats["sends_ok" if ok else "sends_failed"] += 1
            elif op.kind == _RECV:
                self.stats["recvs_ok" if ok else "recvs_failed"] += 1
            else:
                for k in op.keys:
                    self.tier.end_store(k, ok)
                self.stats["stores_ok" if ok else "stores_failed"] += 1
            ended.append((op.req_id, op.kind, ok))
            r = self._reqs.get(op.req_id)
            if r is not None:
                r.ops.discard(op_id)
                if r.async_load == op_id:
                    r.async_load = None
                if r.finished and not r.ops:
                    del self._reqs[op.req_id]
        self.cpu_s += time.thread_time() - t0
        return ended

    def forget(self, req_id: str) -> None:
        """Drop a request the engine no longer knows (its operations still count when reported)."""
        self._reqs.pop(req_id, None)


def check_remote_params(params: Any, world_size: int) -> tuple[list[int], int, list[bytes]]:
    """A producer's :meth:`OffloadLeader.plan_send` value as it arrived (untrusted): (block
    ids, operation id, pool descriptions), or ``InvalidArgumentError`` saying what is wrong."""
    def bad(what: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"kv_transfer_params[{REMOTE_PARAMS_KEY!r}]: {what}")

    if not isinstance(params, dict):
        raise bad(f"must be a dict, got {type(params).__name__}")
    if params.get("v") != _PARAMS_VERSION:
        raise bad(f"version {params.get('v')!r} is not {_PARAMS_VERSION} (producer and consumer run "
                  "different kvsched releases?)")
    ids = params.get("block_ids")
    if not isinstance(ids, list) or not all(type(b) is int and 0 <= b < 2**31 for b in ids):
        raise bad("'block_ids' must be a list of block ids")
    op = params.get("op_id")
    try:
        op_id = int(op, 16) if isinstance(op, str) and len(op) == 32 else -1
    except ValueError:
        op_id = -1
    if op_id <= 0 or op_id & _LAYER_MASK:
        raise bad(f"'op_id' {op!r} is not an operation id")
    pools = params.get("pools")
    if not isinstance(pools, list) or len(pools) != world_size:
        n = len(pools) if isinstance(pools, list) else "no"
        raise bad(f"{n} pools for {world_size} workers (producer and consumer need the same tensor "
                  "parallel size)")
    try:
        raw = [base64.b64decode(p, validate=True) for p in pools]
    except (TypeError, ValueError, binascii.Error) as exc:
        raise bad(f"'pools' are not base64 pool descriptions ({exc})") from None
    return ids, op_id, raw
