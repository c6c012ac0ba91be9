"""A simulated serving engine: the main job of kvsched-bench.

Each iteration runs L layers of compute (busy CPU work with the GIL released on the host backend;
a real spin kernel on the compute stream with the cuda backend is left to bench/gpu_check.sh).
R requests per iteration onboard their cached blocks layer by layer (LOAD before the layer that
reads them) and offload newly written blocks after each layer (STORE gated on
``LayerComplete(k, i)``). An executor thread takes decided handles from ``transfer.poll`` and
submits them to the transfer engine, which marks them when the bytes have landed.

The share of transfer time hidden behind compute is measured in the same run from three passes:
compute only, transfers only (same jobs, no compute, no gating), and both together:

    hidden_fraction = clamp((compute_s + transfer_s - wall_s) / transfer_s, 0, 1)
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import _core
from ..pool import BlockPool
from ..protocol import LayerComplete, TransferKind
from ..scheduler import Scheduler
from ..transfer import TransferEngine


@dataclass
class EngineConfig:
    layers: int = 8
    iterations: int = 12
    requests: int = 4
    blocks_per_layer: int = 4       # blocks each request loads and stores per layer
    block_bytes: int = 64 * 1024
    compute_per_layer_s: float = 0.004
    max_inflight: int = 64
    compute: str = "spin"         # "spin": busy CPU work; "sleep": the CPU is free, as when
                                    # the layer runs on a GPU and the forward thread waits
    backend: str = "host"


@dataclass
class Timeline:
    compute: list[tuple[float, float]] = field(default_factory=list)
    loads: list[tuple[float, float]] = field(default_factory=list)
    stores: list[tuple[float, float]] = field(default_factory=list)


class _Executor:
    """Takes decided handles from the scheduler and submits their copies (one thread)."""

    def __init__(self, sched: Scheduler, engine: TransferEngine, specs: dict, t0: float) -> None:
        self.sched, self.engine, self.specs, self.t0 = sched, engine, specs, t0
        self.jobs: dict[uuid.UUID, tuple[Any, float, threading.Event]] = {}
        self.ready: dict[uuid.UUID, threading.Event] = {}
        self.handoff_us: list[float] = []
        self.mark_times: dict[tuple[int, int], float] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="kvsched-bench-executor", daemon=True)
        self.thread.start()

    def event_for(self, u: uuid.UUID) -> threading.Event:
        with self._lock:
            return self.ready.setdefault(u, threading.Event())

    def _run(self) -> None:
        t = self.sched.transfer
        while not self._stop.is_set():
            for h in t.poll(max_items=256, timeout=0.05):
                now = time.perf_counter()
                spec = self.specs.pop(h.uuid)
                key = spec.get("gate")
                if key is not None and key in self.mark_times:
                    self.handoff_us.append((now - self.mark_times[key]) * 1e6)
                if h.decision is None or int(h.decision) != 1:
                    continue
                try:
                    job = self.engine.submit(h, src=spec["src"], dst=spec["dst"],
                                             pairs=spec["pairs"], layers=spec["layers"])
                except Exception as exc:  # queue full or a bug: fail the op, never lose it
                    self.errors.append(repr(exc))
                    h.mark_complete(exc)
                    job = None
                with self._lock:
                    self.jobs[h.uuid] = (job, now - self.t0, self.ready.setdefault(h.uuid, threading.Event()))
                    self.ready[h.uuid].set()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)


def _sleep_until(deadline: float) -> None:
    """Waits without using the CPU (GIL released), precise to about 0.1 ms."""
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(left if left > 0.0005 else 0)


def _pools(cfg: EngineConfig) -> tuple[BlockPool, BlockPool, int]:
    per_iter = cfg.requests * cfg.blocks_per_layer
    num_blocks = per_iter * 2
    elems = cfg.block_bytes // 4
    shape = (cfg.layers, num_blocks, elems)
    if cfg.backend == "cuda":
        # A real device KV cache and pinned host blocks: copies run on the GPU's copy engines.
        from ..transfer.cudart import DeviceBuffer, pinned_zeros

        gpu: Any = DeviceBuffer(shape, np.float32)
        host: Any = pinned_zeros(shape, np.float32)
        host[...] = np.random.default_rng(0).random(shape, dtype=np.float32)
    else:
        gpu = np.zeros(shape, dtype=np.float32)    # the "device" KV cache
        host = np.random.default_rng(0).random(shape, dtype=np.float32)
    return BlockPool.from_array(gpu), BlockPool.from_array(host), per_iter


def _run_pass(cfg: EngineConfig, compute: bool, transfer: bool,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    gpu, host, per_iter = _pools(cfg)
    sched = Scheduler(max_inflight=cfg.max_inflight, num_layers=cfg.layers)
    engine = TransferEngine(sched, backend=cfg.backend)
    specs: dict[uuid.UUID, dict] = {}
    t0 = time.perf_counter()
    ex = _Executor(sched, engine, specs, t0)
    tl = Timeline()
    w, t = sched.worker, sched.transfer
    rng = np.random.default_rng(1)
    all_stores: list[uuid.UUID] = []
    all_loads: list[uuid.UUID] = []
    try:
        # The requests' block lists are drawn before the clock matters: the simulation times the
        # scheduler and the copies, not numpy's random generator.
        plans: dict[int, list[tuple[str, list[tuple[uuid.UUID, uuid.UUID, dict, dict]]]]] = {}
        if transfer:
            for it in range(1, cfg.iterations + 1):
                reqs = []
                for r in range(cfg.requests):
                    ops = []
                    for k in range(cfg.layers):
                        # Scattered block ids, as a paged KV cache hands them out.
                        src_ids = rng.choice(per_iter * 2, cfg.blocks_per_layer, replace=False)
                        dst_ids = rng.choice(per_iter * 2, cfg.blocks_per_layer, replace=False)
                        ops.append((uuid.uuid4(), uuid.uuid4(),
                                    dict(src=host, dst=gpu, layers=[k],
                                         pairs=np.stack([src_ids, dst_ids], axis=1)),
                                    dict(src=gpu, dst=host, layers=[k], gate=(it, k),
                                         pairs=np.stack([dst_ids, src_ids], axis=1))))
                    reqs.append((f"req{r}-it{it}", ops))
                plans[it] = reqs
        t0 = ex.t0 = time.perf_counter()

        def onboard(it: int) -> list[list[uuid.UUID]]:
            """Schedules iteration `it`'s requests: LOADs (no requirement: they run as soon as a
            token is free, ahead of the layer that reads them) and STOREs gated on
            LayerComplete(k, it)."""
            ids: list[list[uuid.UUID]] = [[] for _ in range(cfg.layers)]
            for rid, ops in plans.get(it, []):
                w.create_slot(rid)
                for k, (lu, su, load_spec, store_spec) in enumerate(ops):
                    specs[lu], specs[su] = load_spec, store_spec
                    w.enqueue(rid, lu, TransferKind.LOAD)
                    w.enqueue(rid, su, TransferKind.STORE)
                    t.schedule(rid, lu)
                    t.schedule(rid, su, requirement=LayerComplete(k, it))
                    ids[k].append(lu)
                    all_loads.append(lu)
                    all_stores.append(su)
            return ids

        # The engine's scheduler decides one step ahead: iteration it+1's onboarding is issued
        # when iteration it starts, so its loads overlap iteration it's compute.
        upcoming = onboard(1)
        for _ in range(cfg.iterations):
            it = w.start_next_iteration()
            load_ids = upcoming
            upcoming = onboard(it + 1) if it < cfg.iterations else [[] for _ in range(cfg.layers)]
            for k in range(cfg.layers):
                for lu in load_ids[k]:  # wait_for_layer_load: the layer reads these blocks
                    ex.event_for(lu).wait(30)
                    job = ex.jobs[lu][0]
                    if job is not None:
                        job.wait(30)
                if compute:
                    c0 = time.perf_counter()
                    if cfg.compute == "spin":
                        _core._spin(cfg.compute_per_layer_s)
                    else:
                        _sleep_until(c0 + cfg.compute_per_layer_s)
                    tl.compute.append((c0 - t0, time.perf_counter() - t0))
                ex.mark_times[(it, k)] = time.perf_counter()
                w.mark_layer_complete(k)
            w.mark_iteration_complete()
            if progress:
                progress(f"iteration {it}/{cfg.iterations}")
        # Drain: every store must land before the blocks could be reused.
        for su in all_stores:
            ex.event_for(su).wait(30)
            job = ex.jobs[su][0]
            if job is not None:
                job.wait(30)
        wall = time.perf_counter() - t0
        for ids, bucket in ((all_loads, tl.loads), (all_stores, tl.stores)):
            for u in ids:
                job, start, _ = ex.jobs[u]
                if job is not None and job.seconds is not None:
                    bucket.append((start, start + job.seconds))
        failed = sum(1 for u in all_loads + all_stores
                     if ex.jobs[u][0] is None or not ex.jobs[u][0].ok)
        stats = sched.stats()
    finally:
        ex.stop()
        engine.close(timeout=30)
        sched.close()
    return {"wall_s": wall, "timeline": tl, "handoff_us": ex.handoff_us, "failed": failed,
            "ops": len(all_loads) + len(all_stores), "stats": stats, "errors": ex.errors,
            "bytes": (len(all_loads) + len(all_stores)) * cfg.blocks_per_layer * cfg.block_bytes}


def run_engine(cfg: EngineConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = progress or (lambda m: None)
    say("compute only")
    compute_pass = _run_pass(cfg, compute=True, transfer=False)
    say("transfers only")
    transfer_pass = _run_pass(cfg, compute=False, transfer=True)
    say("engine: compute + transfers")
    both = _run_pass(cfg, compute=True, transfer=True, progress=say)
    compute_s, transfer_s, wall_s = compute_pass["wall_s"], transfer_pass["wall_s"], both["wall_s"]
    hidden = (compute_s + transfer_s - wall_s) / transfer_s if transfer_s > 0 else 0.0
    handoff = np.array(both["handoff_us"] or [0.0])
    return {
        "compute_mode": cfg.compute,
        "layers": cfg.layers,
        "iterations": cfg.iterations,
        "requests": cfg.requests,
        "block_bytes": cfg.block_bytes,
        "blocks_per_layer": cfg.blocks_per_layer,
        "compute_s": compute_s,
        "transfer_s": transfer_s,
        "wall_s": wall_s,
        "hidden_fraction": float(min(1.0, max(0.0, hidden))),
        "ops": both["ops"],
        "failed_ops": both["failed"],
        "bytes_moved": both["bytes"],
        "handoff_latency_us": {"p50": float(np.percentile(handoff, 50)),
                               "p99": float(np.percentile(handoff, 99))},
        "core_dispatch_latency_us": {"p50": float(both["stats"]["dispatch_latency_p50_us"]),
                                     "p99": float(both["stats"]["dispatch_latency_p99_us"])},
        "peak_inflight": int(both["stats"]["peak_inflight"]),
        "timeline": both["timeline"],
    }
