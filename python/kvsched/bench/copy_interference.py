"""How much each copy path slows a concurrent compute kernel (``bench/copy_interference.py``).

A GEMM (torch, else cupy) runs on its own compute stream, timed with CUDA events: alone (before
and after, averaged, so clock drift between the two does not count as interference), then while a
copy thread keeps a TransferEngine busy with scattered blocks in one direction on one path:

* ``dma``: batched copies on the copy engine (the engine's default);
* ``loop``: one ``cudaMemcpyAsync`` per block (``batch=False``);
* ``sm-<ctas>``: the SM copy kernel with that many CTAs (``sm_copy="force"``).

The slowdown is ``gemm time with copies / gemm time alone - 1``; issue 12's aim for the SM path is
at most 5 %. The copy rate reached meanwhile is recorded too (a path that slows compute less but
moves nothing is no better). :func:`slowdown` and :func:`summarise` are pure (CPU-tested).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable

import numpy as np

__all__ = ["run_interference", "slowdown", "summarise", "engine_options", "AIM_SM_SLOWDOWN"]

#: issue 12: concurrent compute slowed at most 5 % by the SM path
AIM_SM_SLOWDOWN = 0.05


def engine_options(path: str) -> dict[str, Any]:
    """TransferEngine options that force ``path`` ("dma", "loop" or "sm-<ctas>")."""
    if path == "dma":
        return {"sm_copy": False}
    if path == "loop":
        return {"sm_copy": False, "batch": False}
    if path.startswith("sm-") and path[3:].isdigit():
        return {"sm_copy": "force", "sm_ctas": int(path[3:])}
    raise ValueError(f"unknown copy path {path!r}")


def slowdown(alone_before: float, alone_after: float, with_copies: float) -> float:
    """Relative slowdown of the GEMM while copies ran, against the mean of the runs alone."""
    base = (alone_before + alone_after) / 2
    if base <= 0:
        raise ValueError("the GEMM alone took no time")
    return with_copies / base - 1.0


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst slowdown per path, and whether every SM row meets the aim."""
    worst: dict[str, float] = {}
    for r in rows:
        if r.get("slowdown") is not None:
            worst[r["path"]] = max(worst.get(r["path"], -1.0), float(r["slowdown"]))
    sm = [r for r in rows if r["path"].startswith("sm-") and r.get("slowdown") is not None]
    return {
        "worst_slowdown": {k: round(v, 4) for k, v in sorted(worst.items())},
        "sm_aim": AIM_SM_SLOWDOWN,
        "sm_aim_met": {p: all(r["slowdown"] <= AIM_SM_SLOWDOWN for r in sm if r["path"] == p)
                       for p in sorted({r["path"] for r in sm})},
    }


class _Gemm:
    """``iters`` square matmuls on a compute stream, timed by CUDA events (torch, else cupy)."""

    def __init__(self, n: int) -> None:
        try:
            import torch

            if not torch.cuda.is_available():
                raise ImportError("torch has no CUDA")
            self.lib = "torch"
            self._torch = torch
            self.stream = torch.cuda.Stream()
            with torch.cuda.stream(self.stream):
                self.a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
                self.b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
                self.c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        except ImportError:
            import cupy

            self.lib = "cupy"
            self._cupy = cupy
            self.stream = cupy.cuda.Stream(non_blocking=True)
            with self.stream:
                self.a = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(cupy.float16)
                self.b = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(cupy.float16)
                self.c = cupy.empty((n, n), dtype=cupy.float16)
        self.n = n

    def seconds(self, iters: int) -> float:
        """GPU seconds of ``iters`` matmuls, back to back on the compute stream."""
        if self.lib == "torch":
            torch = self._torch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.stream):
                start.record()
                for _ in range(iters):
                    torch.matmul(self.a, self.b, out=self.c)
                end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        cupy = self._cupy
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        with self.stream:
            start.record()
            for _ in range(iters):
                cupy.matmul(self.a, self.b, out=self.c)
            end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3


class _Copier(threading.Thread):
    """Keeps ``depth`` jobs of ``copies`` scattered blocks in flight until stopped."""

    def __init__(self, engine: Any, src: Any, dst: Any, n_blocks: int, copies: int, depth: int = 2) -> None:
        super().__init__(daemon=True)
        from kvsched.bench.transfer_bench import _BenchHandle

        self.engine, self.src, self.dst = engine, src, dst
        self.handle = _BenchHandle
        self.rng = np.random.default_rng(5)
        self.n_blocks, self.copies, self.depth = n_blocks, copies, depth
        self.stop = threading.Event()
        self.bytes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            jobs: list[Any] = []
            while not self.stop.is_set():
                while len(jobs) < self.depth:
                    pairs = np.stack([self.rng.permutation(self.n_blocks)[:self.copies],
                                      self.rng.permutation(self.n_blocks)[:self.copies]], axis=1)
                    jobs.append(self.engine.submit(self.handle(), self.src, self.dst, pairs))
                job = jobs.pop(0)
                job.wait(60)
                self.bytes += job.nbytes
            for job in jobs:
                job.wait(60)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc


def run_interference(*, paths: list[str], blocks: list[int], directions: list[str], gemm_n: int = 8192,
                     iters: int = 20, copies: int = 1024, pool_bytes: int = 256 << 20, device: int = 0,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every (path, direction, block); returns the JSON-ready result (needs a GPU)."""
    from kvsched.pool import BlockPool
    from kvsched.transfer.cudart import DeviceBuffer, pinned_empty
    from kvsched.transfer.engine import TransferEngine

    say = progress or (lambda msg: None)
    gemm = _Gemm(gemm_n)
    gemm.seconds(3)  # warm-up (library handles, clocks)
    rows: list[dict[str, Any]] = []
    for path in paths:
        engine = TransferEngine(None, backend="cuda", device=device, **engine_options(path))
        try:
            for block in blocks:
                n_blocks = max(copies, pool_bytes // block)
                host = pinned_empty((1, n_blocks, block))
                host[:] = 1
                dev = DeviceBuffer((1, n_blocks, block), device=device)
                pools = {"h2d": (BlockPool.from_array(host), BlockPool.from_array(dev)),
                         "d2h": (BlockPool.from_array(dev), BlockPool.from_array(host))}
                for direction in directions:
                    row: dict[str, Any] = {"path": path, "direction": direction, "block": block, "copies": copies,
                                           "gemm": f"{gemm.lib} {gemm_n}x{gemm_n}"}
                    try:
                        before = statistics.median(gemm.seconds(iters) for _ in range(2))
                        copier = _Copier(engine, *pools[direction], n_blocks, copies)
                        copier.start()
                        time.sleep(0.05)  # copies in steady state before the GEMMs start
                        start_bytes, t0 = copier.bytes, time.perf_counter()
                        during = statistics.median(gemm.seconds(iters) for _ in range(2))
                        moved, window = copier.bytes - start_bytes, time.perf_counter() - t0
                        copier.stop.set()
                        copier.join(120)
                        if copier.error is not None:
                            raise copier.error
                        after = statistics.median(gemm.seconds(iters) for _ in range(2))
                        row.update(gemm_alone_ms=round((before + after) / 2 / iters * 1e3, 4),
                                   gemm_with_copies_ms=round(during / iters * 1e3, 4),
                                   slowdown=round(slowdown(before, after, during), 4),
                                   copy_gbps=round(moved / window / 1e9, 3))
                    except Exception as exc:  # noqa: BLE001 - recorded; the grid goes on
                        row.update(slowdown=None, error=f"{type(exc).__name__}: {exc}")
                    rows.append(row)
                    say(f"{path} {direction} {block} B: slowdown {row.get('slowdown')}, copies "
                        f"{row.get('copy_gbps')} GB/s")
                del pools
                dev.free()
        finally:
            engine.close(timeout=60)
    return {"rows": rows, "summary": summarise(rows), "gemm": f"{gemm.lib} {gemm_n}x{gemm_n}", "iters": iters}
