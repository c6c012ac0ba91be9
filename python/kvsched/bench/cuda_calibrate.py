"""The calibration experiment for the cuda backend's copy paths (``bench/cuda_calibrate.py``).

For each direction (h2d, d2h, both at once), block size and number of copies, it times every way
kvsched can move scattered blocks, on the same buffers and in the same run:

* ``contig``: one ``cudaMemcpyAsync`` of all the bytes (the link's peak in this run; ratios are to it);
* ``loop``: one ``cudaMemcpyAsync`` per block;
* ``dma-<hint>-<order>-<calls>``: ``cuMemcpyBatchAsync`` with the prefer-overlap-with-compute hint
  on (``ov``) or off (``no``), sources read in stream order or ``any`` order (h2d only), and one
  call per job (``one``) or the engine's chunks of 32, 64, 128, ... copies (``chunk``);
* ``sm-<ctas>``: the SM copy kernel with that many CTAs.

Each is timed with CUDA events around the whole job (the GPU's view: copy-engine gaps while the
host still queues copies count), median of ``repeats`` runs after a warm-up, and the destination
of the last run is checked against the source on a sample of blocks.

:func:`derive_calibration` turns the measurements into the table the engine reads
(``CudaOptions(calibration=path)``): per (direction, block, copies), the fastest engine-usable
choice, kept only when it beats the engine's built-in choice by ``margin`` (noise must not flip a
default). :func:`check_aims` compares the results with issue 12's aims. Both are pure (tested on
a CPU machine); the measuring itself needs a GPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable

import numpy as np

from kvsched.transfer.copy_path import Calibration, CopyChoice, DmaSettings

__all__ = ["variants", "grid", "run_calibration", "derive_calibration", "check_aims", "plot", "DEFAULT_VARIANT",
           "parse_variant"]

#: the engine's DMA settings before any measurement
DEFAULT_VARIANT = "dma-ov-stream-chunk"
#: a choice replaces the default only when this much faster (noise between runs is a few %)
MARGIN = 1.05


def variants(direction: str, sm_ctas: Iterable[int] = (12,), *, loop: bool = True) -> list[str]:
    """The variants measured for ``direction`` ("h2d", "d2h" or "both")."""
    orders = ("stream", "any") if direction == "h2d" else ("stream",)
    out = [f"dma-{hint}-{order}-{calls}" for hint in ("ov", "no") for order in orders for calls in ("chunk", "one")]
    if loop:
        out.append("loop")
    out += [f"sm-{int(c)}" for c in sm_ctas]
    return out


def parse_variant(name: str) -> dict[str, Any]:
    """``{"path": "dma", "prefer_overlap": True, "src_order": "stream", "one_call": False}`` and
    so on for a variant name."""
    parts = name.split("-")
    if parts[0] == "dma" and len(parts) == 4 and parts[1] in ("ov", "no") and parts[2] in ("stream", "any") \
            and parts[3] in ("chunk", "one"):
        return {"path": "dma", "prefer_overlap": parts[1] == "ov", "src_order": parts[2], "one_call": parts[3] == "one"}
    if parts[0] == "sm" and len(parts) == 2 and parts[1].isdigit():
        return {"path": "sm", "ctas": int(parts[1])}
    if name in ("loop", "contig"):
        return {"path": name}
    raise ValueError(f"unknown variant {name!r}")


def grid(blocks: list[int], copies: list[int], max_job_bytes: int) -> list[tuple[int, int]]:
    """(block, copies) points, copies cut to fit ``max_job_bytes``, duplicates dropped."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        for n in copies:
            n = max(1, min(n, max_job_bytes // b))
            if (b, n) not in out:
                out.append((b, n))
    return out


# ------------------------------------------------------------------------------ derivation


def derive_calibration(measurements: list[dict[str, Any]], *, sm_ctas: int | None = None,
                       margin: float = MARGIN, source: str = "bench/cuda_calibrate.py") -> tuple[Calibration, list[str]]:
    """The calibration table from ``measurements`` (dicts with direction, block, copies, variant,
    gbps, ok) and notes on what was measured but not adopted.

    Only h2d and d2h cells (a job has one direction); only choices the engine can make: DMA in
    stream order, and the SM kernel at the engine's CTA count (``sm_ctas``; None: the SM path is not
    adopted). A point whose default variant failed or was not measured gets no cell."""
    notes: list[str] = []
    cells: dict[str, list[tuple[int, int, CopyChoice]]] = {}
    points: dict[tuple[str, int, int], dict[str, float]] = {}
    for m in measurements:
        if m.get("direction") not in ("h2d", "d2h") or not m.get("ok", True) or m.get("gbps") is None:
            continue
        points.setdefault((m["direction"], int(m["block"]), int(m["copies"])), {})[m["variant"]] = float(m["gbps"])
    for (direction, block, copies), rates in sorted(points.items()):
        base = rates.get(DEFAULT_VARIANT)
        if base is None:
            continue
        usable = {}
        for name, gbps in rates.items():
            v = parse_variant(name)
            if v["path"] == "dma" and v["src_order"] == "stream":
                usable[name] = gbps
            elif v["path"] == "sm" and sm_ctas is not None and v["ctas"] == sm_ctas:
                usable[name] = gbps
        best = max(usable, key=usable.get)
        fastest = max(rates, key=rates.get)
        if fastest != best and rates[fastest] >= margin * usable[best] and parse_variant(fastest)["path"] != "loop":
            notes.append(f"{direction} {block} B x {copies}: {fastest} ({rates[fastest]:.1f} GB/s) beat every "
                         f"usable choice ({best}, {usable[best]:.1f} GB/s) but is not adopted")
        if best == DEFAULT_VARIANT or usable[best] < margin * base:
            choice = CopyChoice()
        else:
            v = parse_variant(best)
            choice = CopyChoice("sm") if v["path"] == "sm" else CopyChoice(
                "dma", DmaSettings(prefer_overlap=v["prefer_overlap"], src_order="stream", one_call=v["one_call"]))
        cells.setdefault(direction, []).append((block, copies, choice))
    table = Calibration(cells={d: tuple(sorted(c, key=lambda r: (r[0], r[1]))) for d, c in cells.items()},
                        source=source)
    return table, notes


def check_aims(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 12's aims against the measurements: each with what was measured and whether it holds.
    The best engine-usable variant of each point counts (what a calibrated engine would do)."""
    best: dict[tuple[str, int, int], tuple[float, float]] = {}  # (gbps, ratio) of the best usable
    loop: dict[tuple[str, int, int], float] = {}
    for m in measurements:
        if not m.get("ok", True) or m.get("gbps") is None:
            continue
        key = (m["direction"], int(m["block"]), int(m["copies"]))
        v = parse_variant(m["variant"])
        if v["path"] == "loop":
            loop[key] = float(m["gbps"])
        elif v["path"] == "sm" or (v["path"] == "dma" and v["src_order"] == "stream"):
            if key not in best or m["gbps"] > best[key][0]:
                best[key] = (float(m["gbps"]), float(m.get("ratio") or 0.0))

    def aim(name: str, keys: list[tuple[str, int, int]], value: Callable[[tuple[str, int, int]], float],
            target: float) -> dict[str, Any]:
        got = {f"{d} {b} x {n}": round(value((d, b, n)), 3) for d, b, n in keys}
        worst = min(got.values()) if got else None
        return {"aim": name, "target": target, "worst": worst, "met": worst is not None and worst >= target,
                "points": got}

    one_dir = [k for k in best if k[0] in ("h2d", "d2h")]
    return [
        aim("ratio to contiguous, >= 32 KiB blocks", [k for k in one_dir if k[1] >= 32768],
            lambda k: best[k][1], 0.9),
        aim("ratio to contiguous, 4-16 KiB blocks, >= 1024 copies",
            [k for k in one_dir if 4096 <= k[1] <= 16384 and k[2] >= 1024], lambda k: best[k][1], 0.6),
        aim("speed-up over the per-block loop, 4-8 KiB blocks",
            [k for k in one_dir if 4096 <= k[1] <= 8192 and k in loop], lambda k: best[k][0] / loop[k], 2.0),
        aim("both directions at once, GB/s, >= 64 KiB blocks",
            [k for k in best if k[0] == "both" and k[1] >= 65536], lambda k: best[k][0], 80.0),
    ]


# ------------------------------------------------------------------------------ measuring (GPU)


class _Gpu:
    """Streams, events, buffers and the copy functions of one measurement run."""

    def __init__(self, device: int, capacity: int, sm_ctas: Iterable[int]) -> None:
        from cuda.bindings import driver

        from kvsched.transfer.cudart import DeviceBuffer, check, load_runtime, pinned_empty
        from kvsched.transfer.driver_batch import DriverBatchCopier
        from kvsched.transfer.sm_copy import DescriptorTables, SmCopier

        self.rt, self.check = load_runtime(), check
        rt = self.rt
        check(rt, rt.cudaSetDevice(device), "cudaSetDevice")
        check(rt, rt.cudaFree(0), "cudaFree(0)")
        self.streams = {k: check(rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "stream")
                        for k in ("h2d", "d2h")}
        self.capacity = capacity
        self.host = {k: pinned_empty(capacity) for k in ("src", "dst")}
        self.host["src"][:] = np.random.default_rng(1).integers(0, 256, capacity, dtype=np.uint8)
        self.dev = {k: DeviceBuffer(capacity) for k in ("src", "dst")}
        check(rt, rt.cudaMemcpy(self.dev["src"].ptr, int(self.host["src"].ctypes.data), capacity,
                                rt.cudaMemcpyKind.cudaMemcpyDefault), "cudaMemcpy")
        self.batch = DriverBatchCopier(driver)
        self.sm = {int(c): SmCopier(driver, max_ctas=int(c)) for c in sm_ctas}
        self.tables = DescriptorTables(rt)
        self.used_tables: list[np.ndarray] = []  # given back once the run has finished
        self.events = [check(rt, rt.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]
        props = check(rt, rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        self.name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)

    def addresses(self, direction: str, block: int, copies: int, rng: np.random.Generator) -> tuple:
        """Scattered (dsts, srcs, sizes) int64 arrays for one direction."""
        slots = self.capacity // block
        src = rng.permutation(slots)[:copies].astype(np.int64) * block
        dst = rng.permutation(slots)[:copies].astype(np.int64) * block
        if direction == "h2d":
            s0, d0 = int(self.host["src"].ctypes.data), self.dev["dst"].ptr
        else:
            s0, d0 = self.dev["src"].ptr, int(self.host["dst"].ctypes.data)
        return d0 + dst, s0 + src, np.full(copies, block, dtype=np.int64)

    def enqueue(self, variant: str, direction: str, job: tuple, keep: list) -> None:
        from kvsched.transfer.cuda import _chunk_bounds
        from kvsched.transfer.driver_batch import c_array
        from kvsched.transfer.sm_copy import pack_descriptors

        rt, stream = self.rt, self.streams[direction]
        dsts, srcs, sizes = job
        v = parse_variant(variant)
        if v["path"] == "contig":
            self.check(rt, rt.cudaMemcpyAsync(int(dsts[0]), int(srcs[0]), int(sizes.sum()),
                                              rt.cudaMemcpyKind.cudaMemcpyDefault, stream), "cudaMemcpyAsync")
        elif v["path"] == "loop":
            kind = rt.cudaMemcpyKind.cudaMemcpyDefault
            for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
                rt.cudaMemcpyAsync(d, s, n, kind, stream)
        elif v["path"] == "dma":
            settings = DmaSettings(prefer_overlap=v["prefer_overlap"], src_order=v["src_order"], one_call=v["one_call"])
            (d0, dk), (s0, sk), (n0, nk) = c_array(dsts), c_array(srcs), c_array(sizes)
            keep += [dk, sk, nk]
            for start, stop in _chunk_bounds(len(sizes), 1 << 30 if v["one_call"] else 4096, one_call=v["one_call"]):
                rc, _ = self.batch(d0 + 8 * start, s0 + 8 * start, n0 + 8 * start, stop - start, int(stream), settings)
                if rc:
                    raise RuntimeError(f"cuMemcpyBatchAsync failed: {self.batch.error_name(rc)}")
        else:
            table = self.tables.take(len(sizes))
            self.used_tables.append(table)
            pack_descriptors(table, dsts, srcs, sizes)
            rc = self.sm[v["ctas"]].launch(int(table.ctypes.data), len(sizes), int(stream))
            if rc:
                raise RuntimeError(f"cuLaunchKernel failed: {self.sm[v['ctas']].error_name(rc)}")

    def time_once(self, variant: str, jobs: dict[str, tuple]) -> tuple[float, float]:
        """(GPU seconds, host seconds to enqueue) of one run of ``variant`` on every direction in
        ``jobs`` at once, from a common start event."""
        rt, check = self.rt, self.check
        start, h_end, d_end = self.events[:3]
        first = self.streams["h2d"]
        check(rt, rt.cudaEventRecord(start, first), "cudaEventRecord")
        if "d2h" in jobs:
            check(rt, rt.cudaStreamWaitEvent(self.streams["d2h"], start, 0), "cudaStreamWaitEvent")
        keep: list = []
        t0 = time.perf_counter()
        for direction, job in jobs.items():
            self.enqueue(variant, direction, job, keep)
        host = time.perf_counter() - t0
        ends = []
        for direction, end in (("h2d", h_end), ("d2h", d_end)):
            check(rt, rt.cudaEventRecord(end, self.streams[direction]), "cudaEventRecord")
            if direction in jobs:
                ends.append(end)
        seconds = 0.0
        for end in ends:
            check(rt, rt.cudaEventSynchronize(end), "cudaEventSynchronize")
            seconds = max(seconds, float(check(rt, rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")) / 1e3)
        while self.used_tables:
            self.tables.give(self.used_tables.pop())
        return seconds, host

    def verify(self, jobs: dict[str, tuple], rng: np.random.Generator, sample: int = 8) -> bool:
        """The last run's destinations hold their sources, on a sample of copies."""
        from kvsched.transfer.cudart import pinned_empty

        rt = self.rt
        for direction, (dsts, srcs, sizes) in jobs.items():
            for i in rng.choice(len(sizes), size=min(sample, len(sizes)), replace=False):
                n = int(sizes[i])
                a, b = pinned_empty(n), pinned_empty(n)
                for out, ptr in ((a, int(dsts[i])), (b, int(srcs[i]))):
                    self.check(rt, rt.cudaMemcpy(int(out.ctypes.data), ptr, n, rt.cudaMemcpyKind.cudaMemcpyDefault),
                               "cudaMemcpy")
                if not np.array_equal(a, b):
                    return False
        return True

    def clear(self, jobs: dict[str, tuple]) -> None:
        rt = self.rt
        for direction in jobs:
            dst = self.dev["dst"] if direction == "h2d" else None
            if dst is not None:
                self.check(rt, rt.cudaMemset(dst.ptr, 0, self.capacity), "cudaMemset")
            else:
                self.host["dst"][:] = 0


def run_calibration(*, blocks: list[int], copies: list[int], directions: list[str], sm_ctas: list[int],
                    repeats: int = 3, max_job_bytes: int = 256 << 20, budget_s: float = 120.0, device: int = 0,
                    loop_max_copies: int = 16384, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the grid on the GPU (see the module docstring); returns the JSON-ready result.
    Stops starting new points once ``budget_s`` is spent (``complete`` is then False)."""
    t_start = time.perf_counter()
    gpu = _Gpu(device, max_job_bytes, sm_ctas)
    rng = np.random.default_rng(12)
    peak: dict[str, float] = {}
    for direction in directions:
        dirs = ("h2d", "d2h") if direction == "both" else (direction,)
        jobs = {d: gpu.addresses(d, max_job_bytes, 1, rng) for d in dirs}
        gpu.time_once("contig", jobs)
        secs = statistics.median(gpu.time_once("contig", jobs)[0] for _ in range(repeats))
        peak[direction] = len(dirs) * max_job_bytes / secs / 1e9
    measurements: list[dict[str, Any]] = []
    complete = True
    for block, n in grid(blocks, copies, max_job_bytes):
        if time.perf_counter() - t_start > budget_s:
            complete = False
            break
        for direction in directions:
            dirs = ("h2d", "d2h") if direction == "both" else (direction,)
            jobs = {d: gpu.addresses(d, block, n, rng) for d in dirs}
            for variant in variants(direction, sm_ctas, loop=n <= loop_max_copies):
                if direction == "both" and "-any-" in variant:
                    continue
                row: dict[str, Any] = {"direction": direction, "block": block, "copies": n, "variant": variant}
                try:
                    gpu.clear(jobs)
                    gpu.time_once(variant, jobs)  # warm-up
                    runs = [gpu.time_once(variant, jobs) for _ in range(repeats)]
                    secs = statistics.median(r[0] for r in runs)
                    row["gpu_ms"] = round(secs * 1e3, 4)
                    row["host_us"] = round(statistics.median(r[1] for r in runs) * 1e6, 1)
                    row["gbps"] = round(len(dirs) * block * n / secs / 1e9, 3)
                    row["ratio"] = round(row["gbps"] / peak[direction], 4)
                    row["ok"] = gpu.verify(jobs, rng)
                except Exception as exc:  # noqa: BLE001 - recorded; the grid goes on
                    row.update(ok=False, gbps=None, error=f"{type(exc).__name__}: {exc}")
                measurements.append(row)
                if progress:
                    progress(f"{direction} {block} B x {n} {variant}: {row.get('gbps')} GB/s"
                             + ("" if row.get("ok") else " FAILED"))
    engine_ctas = 12 if 12 in sm_ctas else (sm_ctas[0] if sm_ctas else None)
    table, notes = derive_calibration(measurements, sm_ctas=engine_ctas,
                                      source=f"bench/cuda_calibrate.py on {gpu.name}, {time.strftime('%Y-%m-%d')}")
    return {
        "gpu": gpu.name,
        "peak_gbps": {k: round(v, 3) for k, v in peak.items()},
        "repeats": repeats,
        "max_job_bytes": max_job_bytes,
        "complete": complete,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "measurements": measurements,
        "calibration": {**table.to_dict(), "sm_ctas": engine_ctas},
        "not_adopted": notes,
        "aims": check_aims(measurements),
    }


def plot(result: dict[str, Any], path: str) -> None:
    """GB/s against block size, one panel per direction, a line per variant at the largest copy
    count measured for each block size; the dashed line is the contiguous copy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = sorted({m["direction"] for m in result["measurements"]}, key=["h2d", "d2h", "both"].index)
    fig, axes = plt.subplots(1, max(1, len(directions)), figsize=(6 * max(1, len(directions)), 4.5), squeeze=False)
    for ax, direction in zip(axes[0], directions):
        rows = [m for m in result["measurements"] if m["direction"] == direction and m.get("gbps")]
        most = {}
        for m in rows:
            most[m["block"]] = max(most.get(m["block"], 0), m["copies"])
        for variant in sorted({m["variant"] for m in rows}):
            pts = sorted((m["block"], m["gbps"]) for m in rows if m["variant"] == variant and m["copies"] == most[m["block"]])
            if pts:
                ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], marker="o", label=variant,
                        linewidth=2.5 if variant.startswith("sm") or variant == DEFAULT_VARIANT else 1)
        ax.axhline(result["peak_gbps"].get(direction, 0), linestyle="--", color="gray", label="contiguous")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (KiB)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{direction} ({result.get('gpu', '')})")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
