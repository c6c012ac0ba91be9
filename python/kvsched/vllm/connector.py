"""``KvschedConnector``: vLLM's ``KVConnectorBase_V1`` over :mod:`kvsched.offload`.

A thin adapter. The scheduler-side role turns vLLM's requests and scheduler output into calls
of :class:`~kvsched.offload.OffloadLeader`; the worker role turns vLLM's model-runner hooks into
calls of :class:`~kvsched.offload.OffloadWorker`. ``docs/vllm.md`` follows one request through
both, step by step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvsched.errors import InvalidArgumentError
from kvsched.offload import OffloadConfig, OffloadLeader, OffloadWorker, OpReports, StepPlan
from kvsched.offload.leader import REMOTE_PARAMS_KEY, check_remote_params
from kvsched.pool import BlockPool

try:  # the tier a hit came from, for vLLM's per-source hit metrics (newer vLLM)
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    _HOST_SOURCE: Any = CacheHitSource.HOST
except ImportError:  # pragma: no cover - older vLLM
    _HOST_SOURCE = None

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["KvschedConnector", "KvschedConnectorMetadata", "KvschedWorkerMetadata", "KvschedConnectorStats",
           "KvschedHandshakeMetadata"]

log = logging.getLogger("kvsched")


class KvschedConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> workers, once per step: the step's :class:`~kvsched.offload.StepPlan`."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KvschedWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler, once per step: outcomes of the operations that ended."""

    def __init__(self, reports: OpReports) -> None:
        self.reports = reports

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KvschedWorkerMetadata":
        if isinstance(other, KvschedWorkerMetadata):
            self.reports = OpReports({k: list(v) for k, v in self.reports.ops.items()}).aggregate(other.reports)
        return self


class KvschedHandshakeMetadata(KVConnectorHandshakeMetadata):
    """Worker -> scheduler side, once at start-up (vLLM's handshake path, disaggregated roles):
    the worker's GPU pool as ``TransferEngine.export_pool`` bytes, NIXL agent metadata
    included."""

    def __init__(self, pool: bytes) -> None:
        self.pool = pool


_STAT_KEYS = (
    "hit_tokens", "lookup_tokens", "loads_ok", "loads_failed", "stores_ok", "stores_failed",
    "blocks_loaded", "blocks_stored", "bytes_loaded", "bytes_stored", "load_s", "store_s",
    "preemptions", "evictions", "stores_skipped_full", "sends_ok", "sends_failed",
)
# vLLM's kv_role -> the worker's part in disaggregated serving (None: a host tier only)
_PEER_ROLES = {"kv_both": None, "kv_producer": "producer", "kv_consumer": "consumer"}


@dataclass
class KvschedConnectorStats(KVConnectorStats):
    """Counters since the last report: hits (tokens), blocks and bytes loaded and stored,
    failures, transfer seconds. Sums across workers and the scheduler side."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {k: 0 for k in _STAT_KEYS}

    def aggregate(self, other: KVConnectorStats | dict[str, Any]) -> "KvschedConnectorStats":
        data = other if isinstance(other, dict) else other.data
        for k, v in (data or {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.data)
        lookups = self.data.get("lookup_tokens", 0)
        out["hit_rate"] = self.data.get("hit_tokens", 0) / lookups if lookups else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KvschedConnector(KVConnectorBase_V1):
    """Host-memory KV tier on kvsched. Extra config: ``host_bytes`` (required), ``load_mode``
    (``"async"`` | ``"layerwise"``), ``max_inflight``, ``backend`` (``"auto"`` | ``"host"`` |
    ``"cuda"``), ``op_timeout``, ``op_granularity`` (``"auto"`` | ``"layer"`` | ``"step"``),
    ``remote_timeout``; see :class:`kvsched.offload.OffloadConfig`.

    ``kv_role``: ``kv_both`` (the tier); ``kv_producer`` / ``kv_consumer`` add disaggregated
    prefill and decode over NIXL (``kvsched[nixl]``): a producer's finished request carries
    what the consumer needs in its ``kv_transfer_params``, the consumer reads the blocks from
    the producer's GPU memory; ``docs/disaggregation.md``."""

    if _HOST_SOURCE is not None:
        _cache_hit_source = _HOST_SOURCE

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.config = OffloadConfig.from_dict(extra, where="KvschedConnector kv_connector_extra_config")
        parallel = vllm_config.parallel_config
        self.world_size = int(parallel.tensor_parallel_size) * int(parallel.pipeline_parallel_size)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.layerwise = self.config.load_mode == "layerwise"
        self.leader: OffloadLeader | None = None
        self.worker: OffloadWorker | None = None
        self._requests: dict[str, "Request"] = {}
        self._layer_index: dict[str, int] = {}
        self._cuda = False
        self._last_stats = {"hit_tokens": 0, "lookup_tokens": 0, "evictions": 0, "stores_skipped_full": 0}
        kv_role = vllm_config.kv_transfer_config.kv_role
        if kv_role not in _PEER_ROLES:
            raise InvalidArgumentError(f"KvschedConnector: kv_role must be one of {sorted(_PEER_ROLES)}, got {kv_role!r}")
        self.peer_role = _PEER_ROLES[kv_role]
        # consumer: requests whose prompt a peer computed -> (its parameters, tokens computed here)
        self._remote_reqs: dict[str, tuple[dict[str, Any], int]] = {}
        if role == KVConnectorRole.SCHEDULER:
            if kv_cache_config is None:
                raise InvalidArgumentError("KvschedConnector needs vLLM's kv_cache_config (vLLM >= 0.33)")
            groups = kv_cache_config.kv_cache_groups
            if len(groups) != 1:
                raise InvalidArgumentError(
                    f"KvschedConnector supports one KV cache group (full attention), got {len(groups)}"
                )
            spec = groups[0].kv_cache_spec
            block_bytes = int(spec.page_size_bytes) * len(groups[0].layer_names)
            capacity = self.config.num_host_blocks(block_bytes, self.world_size,
                                                   where="KvschedConnector kv_connector_extra_config")
            self.leader = OffloadLeader(capacity, self.block_size, layerwise=self.layerwise, world_size=self.world_size)
        else:
            self.worker = OffloadWorker(self.config, world_size=self.world_size, rank=_tp_rank(),
                                        peer_role=self.peer_role)

    # ================================================================== scheduler side

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        self._requests[request.request_id] = request
        if self.peer_role == "consumer":
            remote = self._remote_params(request)
            if remote is not None:  # a producer computed the prompt: read all of it, asynchronously
                n = request.num_prompt_tokens - num_computed_tokens
                if n > 0:
                    self._remote_reqs[request.request_id] = (remote, num_computed_tokens)
                    return n, True
        n = self.leader.lookup(request.request_id, request.block_hashes, num_computed_tokens, request.num_tokens)
        if n is None:  # the next block is being stored: vLLM asks again at a later step
            return None, False
        return n, n > 0 and not self.layerwise

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        remote = self._remote_reqs.pop(request.request_id, None)
        if num_external_tokens <= 0:
            return
        self._requests[request.request_id] = request
        if remote is not None:  # blocks: the local prefix-cache hits, then the new ones
            params, local_tokens = remote
            self.leader.plan_recv(request.request_id, params, blocks.get_block_ids()[0], local_tokens,
                                  num_external_tokens)
            request.kv_transfer_params["do_remote_prefill"] = False  # read once; a failed read recomputes
            return
        self.leader.plan_load(request.request_id, request.block_hashes, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        leader, bs = self.leader, self.block_size
        for rid in scheduler_output.preempted_req_ids or ():
            leader.preempted(rid)
        manager = self._kv_cache_manager
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            req = self._requests.get(rid)
            if req is None or n <= 0:
                continue
            before = req.num_computed_tokens
            first, end = before // bs, min(before + n, req.num_tokens) // bs
            if end <= first:
                continue
            block_ids = manager.get_block_ids(rid)[0] if manager is not None else _scheduled_block_ids(scheduler_output, rid)
            leader.plan_stores(rid, req.block_hashes, block_ids, first, end)
        meta = KvschedConnectorMetadata(leader.take_plan())
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        self._requests.pop(rid, None)
        self._remote_reqs.pop(rid, None)
        aborted = request.status == RequestStatus.FINISHED_ABORTED
        params = request.kv_transfer_params
        if self.peer_role == "consumer" and isinstance(params, dict) and params.get("do_remote_prefill"):
            # Ended without a read planned (aborted while it waited, or computed here): the producer
            # is told, and frees the blocks it keeps for this request now, not after remote_timeout.
            params["do_remote_prefill"] = False
            self.leader.cancel_recv(rid, params.get(REMOTE_PARAMS_KEY))
        remote = None
        if (self.peer_role == "producer" and not aborted and isinstance(params, dict)
                and params.get("do_remote_decode") and request.status == RequestStatus.FINISHED_LENGTH_CAPPED):
            # The prefill is done: keep its blocks for the consumer's read (released when the
            # read's notification arrives, or after remote_timeout).
            remote = self.leader.plan_send(rid, block_ids)
            if remote is None:
                log.warning("kvsched: request %r: the workers' KV pool descriptions have not reached the "
                            "scheduler side (vLLM's handshake metadata); the consumer will compute its prompt", rid)
        delay = self.leader.finished(rid, aborted=aborted)
        if remote is None:
            return delay, None
        return delay, {"do_remote_prefill": True, "do_remote_decode": False,
                       "remote_engine_id": self._vllm_config.kv_transfer_config.engine_id, REMOTE_PARAMS_KEY: remote}

    def _remote_params(self, request: "Request") -> dict[str, Any] | None:
        """Consumer: the producer's part of the request's ``kv_transfer_params`` when it asks for
        a read and is well formed (else None: the engine computes the prompt itself)."""
        params = request.kv_transfer_params
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            return None
        remote = params.get(REMOTE_PARAMS_KEY)
        try:
            check_remote_params(remote, self.world_size)
        except InvalidArgumentError as exc:
            log.warning("kvsched: request %r: computing its prompt here: %s", request.request_id, exc)
            params["do_remote_prefill"] = False
            return None
        return remote

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        # vLLM's engine core: every worker's get_handshake_metadata, after it registered its KV
        # caches and before the first step. A producer hands the pools to its consumers.
        if self.leader is None:
            return
        for rank, meta in (metadata or {}).items():
            if isinstance(meta, KvschedHandshakeMetadata):
                self.leader.exports[int(rank)] = meta.pool

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KvschedWorkerMetadata):
            self.leader.on_reports(meta.reports)

    def reset_cache(self) -> bool | None:
        if self.leader is not None:
            self.leader.tier.clear()
            return True
        return None

    # ================================================================== worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe vLLM's KV tensors as one kvsched pool, layers in forward order: per-layer
        ``(2, num_blocks, ...)`` (K/V as two pieces, block dimension 1) or per-layer views
        ``(num_blocks, ...)`` of a shared buffer, strided as vLLM laid them out."""
        names = _forward_order(kv_caches)
        seen: dict[int, str] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name in names:  # cross-layer KV sharing: one tensor under several names, copied once
            t = kv_caches[name]
            key = t.data_ptr()
            if key in seen:
                self._layer_index[name] = self._layer_index[seen[key]]
                continue
            seen[key] = name
            self._layer_index[name] = len(tensors)
            tensors[name] = t
        first = next(iter(tensors.values()))
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config is not None else None
        block_dim = 1 if first.dim() >= 3 and first.shape[0] == 2 and (num_blocks is None or first.shape[1] == num_blocks) else 0
        pool = BlockPool.from_layers(tensors, block_dim=block_dim)
        self._cuda = pool.is_cuda
        self.worker.register(pool)

    def get_handshake_metadata(self) -> KvschedHandshakeMetadata | None:
        pool = self.worker.pool_description if self.worker is not None else None
        return None if pool is None else KvschedHandshakeMetadata(pool)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        plan = connector_metadata.plan if isinstance(connector_metadata, KvschedConnectorMetadata) else None
        self.worker.begin_step(plan)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # vLLM calls this before it zeroes or reuses the blocks it took from preempted
        # requests: cancel their pending loads, wait until no copy touches those blocks.
        if isinstance(kv_connector_metadata, KvschedConnectorMetadata):
            self.worker.fence_preempted(kv_connector_metadata.plan)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        worker = self.worker
        if not worker.has_step_loads:
            return
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        worker.start_loads(wait_event=event)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self.layerwise:
            return
        idx = self._layer_index.get(layer_name)
        if idx is None:
            return
        self.worker.wait_layer_load(idx, torch.cuda.current_stream() if self._cuda else None)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        worker = self.worker
        if not worker.wants_layer_events:
            return  # no store in this step: nothing waits on its layers
        idx = self._layer_index.get(layer_name)
        if idx is None:
            return
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        elif idx < worker.first_gating_layer:
            return  # one store per step: only the last layer releases it; no event to keep
        worker.layer_done(idx, event)

    def wait_for_save(self) -> None:
        # Never waits for a copy: stores are reported when they end.
        self.worker.end_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        res = self.worker.collect(finished_req_ids)
        self._step = res
        return res.finished_sending or None, res.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        res = getattr(self, "_step", None)
        return set(res.failed_blocks) if res is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        res = getattr(self, "_step", None)
        if res is None or not res.reports:
            return None
        return KvschedWorkerMetadata(res.reports)

    def get_kv_connector_stats(self) -> KvschedConnectorStats | None:
        if self.worker is not None:
            if not self.worker.stats_changed:  # most steps: nothing moved since the last call
                return None
            s = self.worker.take_stats()
            data = {k: s.get(k, 0) for k in _STAT_KEYS}
        else:
            ls = self.leader.stats
            cur = {"hit_tokens": ls["hit_tokens"], "lookup_tokens": ls["lookup_tokens"],
                   "evictions": self.leader.tier.evictions, "stores_skipped_full": ls["stores_skipped_full"]}
            data = {k: 0 for k in _STAT_KEYS}
            for k, v in cur.items():
                data[k] = v - self._last_stats[k]
            self._last_stats = cur
        stats = KvschedConnectorStats(data=data)
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvschedConnectorStats:
        return KvschedConnectorStats(data=dict(data) if data else {})

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # save_kv_layer / wait_for_layer_load run per layer; a full CUDA graph would skip them
        # (stores would then wait for the iteration's end; layerwise loads would be unordered).
        return (extra_config or {}).get("load_mode", "async") == "layerwise"

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not initialised (tests, single process)
        return 0


def _forward_order(kv_caches: dict[str, Any]) -> list[str]:
    """Layer names sorted by their layer index (the order of save_kv_layer calls)."""
    try:
        from vllm.model_executor.models.utils import extract_layer_index
    except ImportError:  # pragma: no cover
        return list(kv_caches)
    names = list(kv_caches)
    try:
        return sorted(names, key=lambda n: (extract_layer_index(n), names.index(n)))
    except Exception:  # noqa: BLE001 - names without a layer index: keep vLLM's order
        return names


def _scheduled_block_ids(scheduler_output: "SchedulerOutput", rid: str) -> list[int]:
    for new in scheduler_output.scheduled_new_reqs:
        if new.req_id == rid:
            return list(new.block_ids[0])
    return []
