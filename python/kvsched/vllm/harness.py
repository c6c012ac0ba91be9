"""Drive vLLM's real scheduler with kvsched's connector on CPU tensors (no GPU, no model).

A testing tool, shipped so that engine developers can exercise the connector (or compare it with
another connector) in vLLM's own scheduler on any machine: kvsched's tests (``tests/vllm``) and
``bench/vllm_compare.py`` use it. Importing it imports vLLM and sets ``HF_HUB_OFFLINE=1`` (it
writes its tiny model config locally); ``import kvsched.vllm`` alone never imports it.

``Engine`` plays vLLM's engine core and model runner for one scheduler and ``tp`` workers:

* the scheduler is ``vllm.v1.core.sched.scheduler.Scheduler`` with a local model config (no
  network) and ``KvschedConnector`` loaded the way ``--kv-transfer-config`` loads it;
* each worker is a ``KvschedConnector`` in the worker role over KV tensors that vLLM's own
  ``allocate_kv_cache`` lays out (one buffer, per-layer strided views), called in the order
  vLLM's model runner calls it (``kv_connector_model_runner_mixin._get_kv_connector_output``):
  handle_preemptions, bind, [start_load_kv if sync loads], per layer wait_for_layer_load /
  write KV / save_kv_layer, [start_load_kv], wait_for_save, get_finished,
  get_block_ids_with_load_errors, stats, worker metadata;
* the workers' outputs go through vLLM's ``KVOutputAggregator`` back into
  ``update_from_output``.

The "model" is deterministic: the KV of a token at position p in layer l is a value derived
from (the token, p, l); before writing a step's KV every worker checks that the KV of every
earlier position of each scheduled request holds exactly those values (so a load that
delivered wrong bytes, or a failed load not recomputed, is caught), and the sampled token is a
function of the prompt, so outputs can be compared with a run without the connector.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402

from kvsched.offload import OffloadWorker as H_OffloadWorker  # noqa: E402
from kvsched.vllm import KvschedConnector  # noqa: E402

try:
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache
except ImportError:  # pragma: no cover - older layouts
    KVCacheLayout = None
    allocate_kv_cache = None

BLOCK = 16
LAYERS = 3
HEADS = 2
HEAD = 8
VOCAB = 1000
_MODEL_DIR: str | None = None


def model_dir() -> str:
    """A tiny OPT config written locally (ModelConfig reads config.json; no download)."""
    global _MODEL_DIR
    if _MODEL_DIR is None:
        from transformers import OPTConfig

        d = tempfile.mkdtemp(prefix="kvsched-vllm-model-")
        OPTConfig(num_hidden_layers=LAYERS, hidden_size=HEADS * HEAD * 2, ffn_dim=64, num_attention_heads=HEADS * 2,
                  vocab_size=VOCAB, max_position_embeddings=2048).save_pretrained(d)
        _MODEL_DIR = d
    return _MODEL_DIR


def layer_names() -> list[str]:
    return [f"model.decoder.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def make_config(extra: dict[str, Any] | None, *, num_blocks: int = 64, max_batched: int = 256, tp: int = 1,
                prefix_caching: bool = False,
                connector: str = "KvschedConnector", module: str | None = "kvsched.vllm",
                kv_role: str = "kv_both") -> VllmConfig:
    mc = ModelConfig(model=model_dir(), tokenizer=model_dir(), skip_tokenizer_init=True, dtype="float16",
                     max_model_len=1024, seed=0)
    sc = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_batched, max_model_len=1024,
                         is_encoder_decoder=False, enable_chunked_prefill=True, async_scheduling=False)
    cc = CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching)
    cc.num_gpu_blocks = num_blocks
    kt = None
    if extra is not None:
        kt = KVTransferConfig(kv_connector=connector, kv_role=kv_role, kv_connector_extra_config=extra,
                              kv_connector_module_path=module, kv_load_failure_policy="recompute")
    pc = ParallelConfig(tensor_parallel_size=tp) if tp > 1 else ParallelConfig()
    return VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc, kv_transfer_config=kt,
                      device_config=DeviceConfig("cpu"), parallel_config=pc)


def spec() -> FullAttentionSpec:
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)


def kv_cache_config(num_blocks: int, layout: str = "LBHNC") -> KVCacheConfig:
    page = spec().page_size_bytes
    names = layer_names()
    compact = not layout.startswith("B")
    tensor = KVCacheTensor(size=page * LAYERS * num_blocks, layers=names,
                           layer_stride=page * num_blocks if compact else page,
                           block_stride=page if compact else page * LAYERS)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[tensor],
                         kv_cache_groups=[KVCacheGroupSpec(names, spec())])


def allocate(cfg: KVCacheConfig, layout: str) -> dict[str, torch.Tensor]:
    """KV tensors as vLLM's runner makes them: ``layout`` is a KVCacheLayout name (per-layer
    strided views of one buffer) or ``"FA"`` (per-layer (2, blocks, block_size, heads, dim))."""
    if layout == "FA":
        return {n: torch.zeros(2, cfg.num_blocks, BLOCK, HEADS, HEAD, dtype=torch.float16) for n in layer_names()}
    return allocate_kv_cache(cfg, torch.device("cpu"), KVCacheLayout[layout])


def kv_value(token: int, pos: int, layer: int) -> float:
    return float((token * 31 + pos * 7 + layer * 13) % 1021 + 1)  # exact in float16, never 0


def write_kv(t: torch.Tensor, layout: str, block: int, off: int, value: float) -> None:
    if layout == "FA":
        t[:, block, off] = value
    else:
        t[block, :, off, :] = value


def read_kv(t: torch.Tensor, layout: str, block: int, off: int) -> torch.Tensor:
    return t[:, block, off] if layout == "FA" else t[block, :, off, :]


class Worker:
    """One GPU worker: its KV tensors and its connector in the worker role."""

    def __init__(self, vllm_config: VllmConfig, cfg: KVCacheConfig, layout: str, fault_hook: Any = None,
                 rank: int = 0) -> None:
        self.layout = layout
        self.kv = allocate(cfg, layout)
        self.errors: list[str] = []
        self.jobs: list[Any] = []
        if vllm_config.kv_transfer_config.kv_connector != "KvschedConnector":  # another connector (bench)
            from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

            self.connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, cfg)
            self.connector.register_kv_caches(self.kv)
            return
        self.connector = KvschedConnector(vllm_config, KVConnectorRole.WORKER, cfg)
        self.connector.worker.rank = rank  # one process plays every rank (vLLM's TP group is not set up)
        if fault_hook is not None:
            self.connector.worker._engine_options["fault_hook"] = fault_hook
        self.connector.register_kv_caches(self.kv)
        worker = self.connector.worker
        for engine, name in ((worker.engine, "submit"), (worker.remote_engine, "submit"),
                             (worker.remote_engine, "expect_remote")):
            if engine is not None:
                setattr(engine, name, self._tracked(getattr(engine, name)))

    def _tracked(self, fn: Any) -> Any:
        def tracked(h: Any, *args: Any, **kwargs: Any) -> Any:
            job = fn(h, *args, **kwargs)
            self.jobs.append(job)
            return job

        return tracked

    def running_jobs(self, rid: str) -> list[Any]:
        return [j for j in self.jobs if not j.done() and str(j.request_id).split("\x00")[0] == rid]

    def check_prefix(self, req: Request, block_ids: list[int], upto: int, layer: int) -> None:
        """What attention reads in ``layer``: the KV of every earlier position, in that layer
        (checked after wait_for_layer_load(layer), as a layer reads only its own KV)."""
        if req.request_id in self.step_errors:
            return
        for name in layer_names()[layer : layer + 1]:
            t = self.kv[name]
            for pos in range(upto):
                got = read_kv(t, self.layout, block_ids[pos // BLOCK], pos % BLOCK)
                want = kv_value(req.all_token_ids[pos], pos, layer)
                if not bool((got == want).all()):
                    self.step_errors[req.request_id] = (
                        f"{req.request_id}: layer {layer} pos {pos}: {got.flatten()[0].item()} != {want}")
                    return

    def run(self, so: Any, requests: dict[str, Request], block_ids: dict[str, list[int]], starts: dict[str, int],
            *, check: bool = True) -> ModelRunnerOutput:
        c = self.connector
        meta = so.kv_connector_metadata
        c.handle_preemptions(meta)
        for b in so.new_block_ids_to_zero or ():
            for t in self.kv.values():
                write_kv(t, self.layout, b, slice(None), 0.0)
        c.bind_connector_metadata(meta)
        if so.has_sync_kv_loads:
            c.start_load_kv(None)
        req_ids = list(so.num_scheduled_tokens)
        sampled: list[list[int]] = []
        self.step_errors: dict[str, str] = {}
        if so.total_num_scheduled_tokens:
            for layer, name in enumerate(layer_names()):
                c.wait_for_layer_load(name)
                t = self.kv[name]
                for rid in req_ids:
                    req, ids = requests[rid], block_ids[rid]
                    start = starts[rid]
                    if check:
                        self.check_prefix(req, ids, start, layer)
                    for pos in range(start, start + so.num_scheduled_tokens[rid]):
                        write_kv(t, self.layout, ids[pos // BLOCK], pos % BLOCK,
                                 kv_value(req.all_token_ids[pos], pos, layer))
                c.save_kv_layer(name, t, None)
            for rid in req_ids:
                req = requests[rid]
                done = starts[rid] + so.num_scheduled_tokens[rid] >= req.num_tokens
                sampled.append([next_token(req)] if done else [])
        if not so.has_sync_kv_loads:
            c.start_load_kv(None)
        c.wait_for_save()
        res = c.get_transfer_results(so.finished_req_ids)
        out = KVConnectorOutput(
            finished_sending=res.finished_sending or None,
            finished_recving=res.finished_recving or None,
            failed_recving=res.failed_recving,
            invalid_block_ids=c.get_block_ids_with_load_errors(),
            kv_connector_stats=c.get_kv_connector_stats(),
            kv_connector_worker_meta=c.build_connector_worker_meta(),
        )
        c.clear_connector_metadata()
        # A synchronous (layerwise) load that failed is reported at the end of the step that
        # computed on it; vLLM then discards that step's output for the request and recomputes.
        for rid, msg in self.step_errors.items():
            if not out.invalid_block_ids.intersection(block_ids[rid]):
                self.errors.append(msg)
        kwargs: dict[str, Any] = {}
        if "req_id_to_index" in ModelRunnerOutput.__dataclass_fields__:  # vLLM 0.33; gone in 0.34
            kwargs["req_id_to_index"] = {r: i for i, r in enumerate(req_ids)}
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled, kv_connector_output=out, **kwargs)


def next_token(req: Request) -> int:
    """The deterministic 'model': a function of every token so far."""
    return _next(req.all_token_ids)


def _next(toks: Any) -> int:
    return (sum(toks) * 7 + len(toks)) % (VOCAB - 10) + 5


def expected_output(prompt_ids: list[int], max_tokens: int) -> list[int]:
    toks, out = list(prompt_ids), []
    for _ in range(max_tokens):
        out.append(_next(toks))
        toks.append(out[-1])
    return out


@dataclass
class Engine:
    extra: dict[str, Any] | None
    num_blocks: int = 64
    layout: str = "LBHNC"
    tp: int = 1
    max_batched: int = 256
    fault_hook: Any = None
    connector_name: str = "KvschedConnector"
    connector_module: str | None = "kvsched.vllm"
    prefix_caching: bool = False  # vLLM's own GPU prefix cache (off: every hit comes from the tier)
    kv_role: str = "kv_both"  # kv_producer / kv_consumer: disaggregated prefill and decode
    scheduler: Any = field(init=False)
    workers: list[Worker] = field(init=False)
    outputs: dict[str, list[int]] = field(init=False, default_factory=dict)
    # kv_transfer_params of finished requests (a producer's, for the consumer)
    transfer_params: dict[str, Any] = field(init=False, default_factory=dict)
    steps: int = field(init=False, default=0)
    hit_tokens: int = field(init=False, default=0)
    stats: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.vllm_config = make_config(self.extra, num_blocks=self.num_blocks, max_batched=self.max_batched, tp=self.tp,
                                       prefix_caching=self.prefix_caching, connector=self.connector_name,
                                       module=self.connector_module, kv_role=self.kv_role)
        self.kv_cfg = kv_cache_config(self.num_blocks, self.layout if self.layout != "FA" else "LBHNC")
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(BLOCK, sha256)
        self.scheduler = Scheduler(vllm_config=self.vllm_config, kv_cache_config=self.kv_cfg, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.vllm_config),
                                   block_size=BLOCK)
        self.workers = [Worker(self.vllm_config, self.kv_cfg, self.layout, self.fault_hook, rank) for rank in range(self.tp)]
        # vLLM's engine core hands the workers' handshake metadata to the scheduler side once the
        # KV caches are registered (disaggregated roles: their pool descriptions).
        handshake = {rank: w.connector.get_handshake_metadata() for rank, w in enumerate(self.workers)}
        handshake = {rank: m for rank, m in handshake.items() if m is not None}
        if handshake:
            self.scheduler.connector.set_xfer_handshake_metadata(handshake)
        self.aggregator = KVOutputAggregator(self.tp)
        self.requests: dict[str, Request] = {}
        self.live: set[str] = set()
        self.preempted: set[str] = set()

    @property
    def connector(self) -> KvschedConnector:
        return self.scheduler.connector

    def add(self, rid: str, prompt: list[int], max_tokens: int = 4, kv_transfer_params: dict[str, Any] | None = None) -> Request:
        """Queue a request; ``kv_transfer_params`` as a client (or a P/D proxy) passes them."""
        extra = None if kv_transfer_params is None else {"kv_transfer_params": kv_transfer_params}
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, extra_args=extra)
        req = Request(rid, prompt, sp, None, block_hasher=self.hasher)
        self.scheduler.add_request(req)
        self.requests[rid] = req
        self.outputs[rid] = []
        self.live.add(rid)
        return req

    def step(self, *, check: bool = True) -> Any:
        sched = self.scheduler
        so = sched.schedule()
        block_ids = {rid: list(sched.kv_cache_manager.get_block_ids(rid)[0]) for rid in so.num_scheduled_tokens}
        starts = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens))
        outs = [w.run(so, sched.requests, block_ids, starts, check=check) for w in self.workers]
        out = self.aggregator.aggregate(outs) if self.tp > 1 else outs[0]
        eco = sched.update_from_output(so, out)
        for eng_out in eco.values():
            for o in eng_out.outputs:
                self.outputs[o.request_id].extend(o.new_token_ids)
                if o.kv_transfer_params is not None:
                    self.transfer_params[o.request_id] = o.kv_transfer_params
            if eng_out.scheduler_stats is not None:
                st = eng_out.scheduler_stats
                if st.connector_prefix_cache_stats is not None:
                    self.hit_tokens += st.connector_prefix_cache_stats.hits
                if st.kv_connector_stats:
                    self.stats.append(st.kv_connector_stats)
        self.steps += 1
        for w in self.workers:
            assert not w.errors, w.errors[:3]
        # vLLM freed the blocks of requests it no longer holds: no copy of theirs may still run
        for rid in list(self.live):
            if rid not in sched.requests:
                self.live.discard(rid)
                for w in self.workers:
                    assert not w.running_jobs(rid), f"{rid}: copies still running after vLLM freed its blocks"
        self.preempted.update(so.preempted_req_ids or ())
        return so

    def run(self, max_steps: int = 200, *, until=None) -> None:
        for _ in range(max_steps):
            if until is not None and until():
                return
            if until is None and not self.busy():
                return
            self.step()
            if until is None:
                self.drain_wait()
        raise AssertionError(f"not done after {max_steps} steps: {self.scheduler.get_num_unfinished_requests()} unfinished")

    def busy(self) -> bool:
        s = self.scheduler
        leader = getattr(self.connector, "leader", None)
        # vLLM's OffloadingConnector (bench): its scheduler side's transfer jobs in flight
        other = getattr(getattr(self.connector, "connector_scheduler", None), "_jobs", None)
        return bool(s.get_num_unfinished_requests() or s.has_finished_requests()
                    or (leader is not None and leader.pending_ops()) or other or s.finished_req_ids)

    def drain_wait(self) -> None:
        for w in self.workers:
            worker = getattr(w.connector, "worker", None)
            if isinstance(worker, H_OffloadWorker):
                worker.engine.wait_idle(10)
                if worker.peer_role == "consumer":  # its reads (a producer's waits end with a peer's read)
                    worker.remote_engine.wait_idle(10)
            elif hasattr(w.connector, "drain"):
                w.connector.drain()

    def abort(self, rid: str) -> None:
        self.scheduler.finish_requests(rid, RequestStatus.FINISHED_ABORTED)

    def assert_empty(self) -> None:
        s = self.scheduler
        assert not s.requests, list(s.requests)
        assert not s.running and len(s.waiting) == 0
        assert s.kv_cache_manager.block_pool.get_num_free_blocks() == self.num_blocks - 1
        assert self.connector.leader.pending_ops() == 0
        for w in self.workers:
            assert w.connector.worker.engine.pending == 0
            remote = w.connector.worker.remote_engine
            assert remote is None or remote.pending == 0

    def close(self) -> None:
        for w in self.workers:
            w.connector.shutdown()


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % (VOCAB - 10) + 5 for i in range(n)]
