"""Scattered-block copy bandwidth: kvsched's path against the copy peak and a per-block loop.

For each block size, the same random scattered set of (src, dst) block pairs is moved three ways,
in one run, on the same buffers:

* ``peak``: one contiguous copy of the same number of bytes (the ceiling);
* ``kvsched``: ``TransferEngine.submit`` of the pairs (coalescing, batching, workers);
* ``per_block``: one copy call per block (what a naive engine does).

Host backend: host to host with numpy. cuda backend: H2D, D2H, and both at once, timed on the
host from launch until the copy stream is drained (``cudaStreamSynchronize``; the reaper's
completion latency is reported separately as ``reap_us``). ``submit_us`` is the time the
submitting thread spent in ``submit``.

``run_transfer_bench`` returns a dict (rows per direction and block size); ``transfer_summary``
picks one row in the shape ``kvsched-bench --json`` uses; ``format_table`` renders the rows.
"""

from __future__ import annotations

import platform
import statistics
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np

from kvsched.pool import BlockPool
from kvsched.protocol import Decision

__all__ = ["run_transfer_bench", "transfer_summary", "format_table", "DEFAULT_SIZES"]

KiB, MiB = 1024, 1024 * 1024
DEFAULT_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB)


class _BenchHandle:
    """A stand-in for a scheduler handle already decided EXECUTE (the bench measures copies)."""

    __slots__ = ("decision", "request_id", "uuid", "error")

    def __init__(self) -> None:
        self.decision = Decision.EXECUTE
        self.request_id = "bench"
        self.uuid = uuid.uuid4()
        self.error = None

    def mark_complete(self, error: Any = None) -> None:
        self.error = error


def run_transfer_bench(
    backend: str = "host",
    block_sizes: Sequence[int] = DEFAULT_SIZES,
    total_bytes: int = 64 * MiB,
    max_blocks: int = 16384,
    repeats: int = 3,
    directions: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
    **engine_options: Any,
) -> dict[str, Any]:
    """Measure every block size; returns ``{"backend", "device", "rows": [...], ...}``.

    ``backend``: "host", "cuda" or "auto". ``total_bytes`` is moved per measurement (blocks =
    total_bytes / block size, capped by ``max_blocks``). The best of ``repeats`` is kept.
    ``directions`` (cuda): any of "h2d", "d2h", "both"."""
    from kvsched.transfer.engine import TransferEngine

    say = progress or (lambda msg: None)
    engine = TransferEngine(None, backend=backend, **engine_options)
    try:
        if engine.backend == "host":
            bench: Any = _HostBench(engine, repeats, seed)
            dirs = ["h2h"]
        else:
            lists_engine = _bindings_engine(engine, engine_options)
            try:
                bench = _CudaBench(engine, repeats, seed, lists_engine)
            except BaseException:
                if lists_engine is not None:
                    lists_engine.close(timeout=60)
                raise
            dirs = list(directions or ("h2d", "d2h", "both"))
        rows = []
        for size in block_sizes:
            blocks = int(max(16, min(max_blocks, total_bytes // size)))
            for direction in dirs:
                say(f"{direction} {_fmt_bytes(size)} x {blocks} blocks")
                rows.append(bench.measure(direction, int(size), blocks))
        result = {
            "backend": engine.backend,
            "device": bench.device_name(),
            "batched": engine.batched,
            "batch_mode": engine.stats().get("batch_mode", "host"),
            "engine": engine.stats(),
            "copy_paths": _copy_paths(engine),
            "repeats": repeats,
            "rows": rows,
        }
        bench.release()
        return result
    finally:
        engine.close(timeout=60)


def _copy_paths(engine: Any) -> dict[str, Any] | None:
    """The cuda backend's SM path state and jobs per path (which path the rows measured)."""
    cuda = getattr(engine, "_cuda", None)
    if cuda is None:
        return None
    return {"sm_mode": cuda.sm_mode, "sm_reason": cuda.sm_reason, "jobs_by_path": dict(cuda.jobs_by_path),
            "calibration": cuda.calibration.source}


def _bindings_engine(engine: Any, options: dict[str, Any]) -> Any:
    """A second cuda engine batching through cuda-bindings' list API, measured side by side with
    the main one when that uses the driver's C-array path; None otherwise."""
    from kvsched.transfer.engine import TransferEngine

    if engine.stats().get("batch_mode") != "driver" or "batch" in options or options.get("sm_copy") not in (None, False, "off"):
        return None
    try:
        return TransferEngine(None, backend="cuda", **{**options, "batch": "bindings"})
    except Exception:  # noqa: BLE001 - the comparison is optional
        return None


def transfer_summary(result: dict[str, Any], block_bytes: int | None = None, direction: str | None = None) -> dict[str, Any]:
    """One row as ``{"block_bytes", "blocks", "peak_gbps", "kvsched_gbps", "per_block_gbps"}``
    (the ``transfer`` section of ``kvsched-bench --json``). Default: the row nearest 64 KiB in
    the first direction measured."""
    rows = result["rows"]
    direction = direction or rows[0]["direction"]
    rows = [r for r in rows if r["direction"] == direction]
    target = block_bytes or 64 * KiB
    row = min(rows, key=lambda r: abs(r["block_bytes"] - target))
    keys = ("block_bytes", "blocks", "peak_gbps", "kvsched_gbps", "per_block_gbps")
    out = {k: row[k] for k in keys}
    out["direction"] = direction
    return out


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'dir':<5} {'block':>7} {'blocks':>6} {'peak GB/s':>10} {'kvsched':>9} {'per-block':>10} "
        f"{'ours/peak':>9} {'ours/loop':>9} {'copies':>7} {'submit us':>10}"
    )
    lists = any("bindings_gbps" in r for r in result["rows"])
    if lists:
        head += f" {'lists GB/s':>10}"
    lines = [
        f"transfer bench: backend={result['backend']} device={result['device']} "
        f"batch={result.get('batch_mode', result['batched'])}",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        line = (
            f"{r['direction']:<5} {_fmt_bytes(r['block_bytes']):>7} {r['blocks']:>6} {r['peak_gbps']:>10.2f} "
            f"{r['kvsched_gbps']:>9.2f} {r['per_block_gbps']:>10.2f} {r['kvsched_vs_peak']:>9.2f} "
            f"{r['kvsched_vs_per_block']:>9.2f} {r['copies']:>7} {r['submit_us']:>10.1f}"
        )
        if lists:
            line += f" {r.get('bindings_gbps', float('nan')):>10.2f}"
        lines.append(line)
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB}M"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB}K"
    return str(n)


def _row(direction: str, size: int, blocks: int, peak: float, ours: float, loop: float, nbytes: int, **extra: Any) -> dict[str, Any]:
    gb = nbytes / 1e9
    row = {
        "direction": direction,
        "block_bytes": size,
        "blocks": blocks,
        "bytes": nbytes,
        "peak_gbps": gb / peak,
        "kvsched_gbps": gb / ours,
        "per_block_gbps": gb / loop,
        "kvsched_vs_peak": peak / ours,
        "kvsched_vs_per_block": loop / ours,
    }
    row.update(extra)
    return row


def _best_of(repeats: int, **methods: Callable[[], float]) -> dict[str, float]:
    """Best time of each method; rounds interleave the methods so drift hits all alike."""
    best = {name: float("inf") for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            best[name] = min(best[name], fn())
    return best


def _scatter(rng: np.random.Generator, n: int, blocks: int) -> np.ndarray:
    """``blocks`` pairs between pools of ``n`` blocks; distinct, random, rarely adjacent."""
    return np.stack([rng.permutation(n)[:blocks], rng.permutation(n)[:blocks]], axis=1).astype(np.int64)


class _HostBench:
    def __init__(self, engine: Any, repeats: int, seed: int) -> None:
        self.engine, self.repeats, self.rng = engine, max(1, repeats), np.random.default_rng(seed)

    def device_name(self) -> str:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return name

    def release(self) -> None:
        pass

    def measure(self, direction: str, size: int, blocks: int) -> dict[str, Any]:
        n = 2 * blocks
        src = self.rng.integers(0, 256, (1, n, size), dtype=np.uint8)
        dst = np.zeros_like(src)
        pairs = _scatter(self.rng, n, blocks)
        sp, dp = BlockPool.from_array(src), BlockPool.from_array(dst)
        nbytes = blocks * size
        flat_src, flat_dst = src.reshape(-1)[:nbytes], dst.reshape(-1)[:nbytes]

        def peak() -> float:
            t0 = time.perf_counter()
            np.copyto(flat_dst, flat_src)
            return time.perf_counter() - t0

        def loop() -> float:
            s_rows, d_rows = src[0], dst[0]
            t0 = time.perf_counter()
            for s, d in pairs.tolist():
                d_rows[d] = s_rows[s]
            return time.perf_counter() - t0

        submit_times, copies = [], 0

        def ours() -> float:
            nonlocal copies
            h = _BenchHandle()
            t0 = time.perf_counter()
            job = self.engine.submit(h, sp, dp, pairs)
            submit_times.append(time.perf_counter() - t0)
            job.wait()
            elapsed = time.perf_counter() - t0
            if h.error is not None:
                raise RuntimeError(f"bench transfer failed: {h.error}")
            copies = job.num_copies
            return elapsed

        best = _best_of(self.repeats, peak=peak, ours=ours, loop=loop)
        # Every method wrote the same destination: clear it and check kvsched's copy alone.
        dst.fill(0)
        ours()
        if not np.array_equal(dst[0, pairs[:, 1]], src[0, pairs[:, 0]]):
            raise RuntimeError("bench copy is not byte-exact")
        return _row(
            direction, size, blocks, best["peak"], best["ours"], best["loop"], nbytes,
            copies=copies, submit_us=statistics.median(submit_times) * 1e6, reap_us=0.0,
        )


class _CudaBench:
    def __init__(self, engine: Any, repeats: int, seed: int, bindings_engine: Any = None) -> None:
        from kvsched.transfer.cudart import check

        self.engine, self.repeats, self.rng = engine, max(1, repeats), np.random.default_rng(seed)
        self.bindings_engine = bindings_engine
        self.rt, self.check = engine._cuda._rt, check  # the engine's runtime (a stand-in in tests)
        rt = self.rt
        self.kind = rt.cudaMemcpyKind.cudaMemcpyDefault
        self.streams = [check(rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags") for _ in range(2)]

    def device_name(self) -> str:
        rt = self.rt
        try:
            dev = self.check(rt, rt.cudaGetDevice(), "cudaGetDevice")
            props = self.check(rt, rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
            name = props.name
            return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
        except Exception:  # noqa: BLE001
            return "cuda"

    def release(self) -> None:
        for s in self.streams:
            self.rt.cudaStreamDestroy(s)
        if self.bindings_engine is not None:
            self.bindings_engine.close(timeout=60)

    def _sync(self, stream: Any) -> None:
        self.check(self.rt, self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def measure(self, direction: str, size: int, blocks: int) -> dict[str, Any]:
        from kvsched.transfer.cudart import DeviceBuffer, pinned_empty

        rt, check = self.rt, self.check
        n = 2 * blocks
        host_a = pinned_empty((1, n, size), runtime=rt)
        host_a[:] = self.rng.integers(0, 256, host_a.shape, dtype=np.uint8)
        host_b = pinned_empty((1, n, size), runtime=rt)
        host_b[:] = 0
        dev_a, dev_b = DeviceBuffer((1, n, size), runtime=rt), DeviceBuffer((1, n, size), runtime=rt)
        pools = {
            "h2d": (BlockPool.from_array(host_a), BlockPool.from_array(dev_a)),
            "d2h": (BlockPool.from_array(dev_b), BlockPool.from_array(host_b)),
        }
        pairs = _scatter(self.rng, n, blocks)
        nbytes = blocks * size
        # addresses for the baselines
        ha, hb = int(host_a.ctypes.data), int(host_b.ctypes.data)
        bases = {"h2d": (ha, dev_a.ptr), "d2h": (dev_b.ptr, hb)}
        legs = ["h2d", "d2h"] if direction == "both" else [direction]
        # seed dev_b so D2H copies real data
        check(rt, rt.cudaMemcpy(dev_b.ptr, ha, n * size, self.kind), "cudaMemcpy")

        def peak() -> float:
            t0 = time.perf_counter()
            for i, leg in enumerate(legs):
                s, d = bases[leg]
                check(rt, rt.cudaMemcpyAsync(d, s, nbytes, self.kind, self.streams[i]), "cudaMemcpyAsync")
            for i in range(len(legs)):
                self._sync(self.streams[i])
            return time.perf_counter() - t0

        src_off = (pairs[:, 0] * size).tolist()
        dst_off = (pairs[:, 1] * size).tolist()

        def loop() -> float:
            t0 = time.perf_counter()
            for i, leg in enumerate(legs):
                s, d = bases[leg]
                stream = self.streams[i]
                for so, do in zip(src_off, dst_off):
                    res = rt.cudaMemcpyAsync(d + do, s + so, size, self.kind, stream)
                    if int(res[0]) != 0:
                        check(rt, res, "cudaMemcpyAsync")
            for i in range(len(legs)):
                self._sync(self.streams[i])
            return time.perf_counter() - t0

        submit_times, reap_times, copies = [], [], 0

        def through(engine: Any, main: bool) -> float:
            nonlocal copies
            handles, jobs = [], []
            t0 = time.perf_counter()
            for leg in legs:
                h = _BenchHandle()
                src, dst = pools[leg]
                ts = time.perf_counter()
                jobs.append(engine.submit(h, src, dst, pairs))
                if main:
                    submit_times.append(time.perf_counter() - ts)
                handles.append(h)
            for leg in legs:
                self._sync(rt.cudaStream_t(engine.stream(leg)))
            elapsed = time.perf_counter() - t0
            drained = time.perf_counter()
            for job, h in zip(jobs, handles):
                job.wait()
                if h.error is not None:
                    raise RuntimeError(f"bench transfer failed: {h.error}")
            if main:
                reap_times.append(max(job.finished_at for job in jobs) - drained)
                copies = sum(job.num_copies for job in jobs)
            return elapsed

        methods: dict[str, Callable[[], float]] = {"peak": peak, "ours": lambda: through(self.engine, True),
                                                   "loop": loop}
        if self.bindings_engine is not None:
            methods["bindings"] = lambda: through(self.bindings_engine, False)
        best = _best_of(self.repeats, **methods)
        # Every method wrote the same destinations: clear them, then check each engine's copy alone.
        zeros = pinned_empty((1, n, size), runtime=rt)
        zeros[:] = 0
        back = pinned_empty((1, n, size), runtime=rt)
        engines = [("kvsched", self.engine)] + ([("lists", self.bindings_engine)] if "bindings" in methods else [])
        for name, engine in engines:
            check(rt, rt.cudaMemcpy(dev_a.ptr, int(zeros.ctypes.data), n * size, self.kind), "cudaMemcpy")
            host_b[:] = 0
            through(engine, False)
            if "h2d" in legs:
                check(rt, rt.cudaMemcpy(int(back.ctypes.data), dev_a.ptr, n * size, self.kind), "cudaMemcpy")
                if not np.array_equal(back[0, pairs[:, 1]], host_a[0, pairs[:, 0]]):
                    raise RuntimeError(f"bench H2D copy ({name}) is not byte-exact")
            if "d2h" in legs and not np.array_equal(host_b[0, pairs[:, 1]], host_a[0, pairs[:, 0]]):
                raise RuntimeError(f"bench D2H copy ({name}) is not byte-exact")
        nbytes_all = nbytes * len(legs)
        extra = {}
        if "bindings" in best:  # the same engine batching through cuda-bindings' Python lists
            extra = {"bindings_gbps": nbytes_all / 1e9 / best["bindings"],
                     "kvsched_vs_bindings": best["bindings"] / best["ours"]}
        row = _row(
            direction, size, blocks, best["peak"], best["ours"], best["loop"], nbytes_all,
            copies=copies, submit_us=statistics.median(submit_times) * 1e6,
            reap_us=statistics.median(reap_times) * 1e6 if reap_times else 0.0, **extra,
        )
        dev_a.free()
        dev_b.free()
        return row
