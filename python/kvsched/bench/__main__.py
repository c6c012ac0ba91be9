"""kvsched-bench: run a simulated serving engine and the baselines side by side.

    kvsched-bench                      # host backend, finishes in well under a minute on 2 cores
    kvsched-bench --quick --json out.json
    kvsched-bench --backend cuda --json gpu.json --plot gpu.png

Needs the ``bench`` extra (``pip install "kvsched[bench]"``, from a checkout ``pip install
".[bench]"``): rich draws the tables and the progress line. Without it, kvsched-bench says how to
install it and exits with status 2.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Any

try:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
except ImportError:  # the bench extra is not installed: main() says how to install it
    Console = None  # type: ignore[assignment,misc]

_NEEDS_RICH = ("kvsched-bench needs the 'bench' extra (rich, for its tables and progress): "
               "pip install \"kvsched[bench]\" (from a checkout: pip install \".[bench]\")")


def _device(backend: str) -> str:
    if backend == "cuda":
        try:
            from cuda.bindings import runtime as rt

            err, props = rt.cudaGetDeviceProperties(0)
            name = props.name
            return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
        except Exception:  # pragma: no cover - reported as the generic name
            return "cuda"
    return f"cpu ({platform.processor() or platform.machine()})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvsched-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("host", "cuda", "auto"), default="host")
    p.add_argument("--quick", action="store_true", help="small sizes, for CI smoke tests")
    p.add_argument("--json", metavar="FILE",
                   help="write the results as JSON (the keys of contract section 5, docs/contract.md)")
    p.add_argument("--plot", metavar="FILE.png", help="bandwidth vs block size and overlap timeline")
    p.add_argument("--ops", type=int, default=None, help="operations per scheduler measurement")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--iterations", type=int, default=None,
                   help="engine iterations (default 24, --quick 4); the cold start and the last "
                        "stores are paid once per run, so short runs show them more")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--compute-ms", type=float, default=4.0, help="compute per layer (ms)")
    p.add_argument("--block-kib", type=int, default=64, help="block size of the engine simulation")
    p.add_argument("--compute", choices=("spin", "sleep", "both"), default="both",
                   help="host backend's layer compute: busy CPU work (spin), a CPU-free wait as "
                        "when the layer runs on a GPU (sleep), or both (json: engine = spin, "
                        "engine_sleep); with --backend cuda a layer is a kernel on a compute stream")
    p.add_argument("--no-pin", action="store_true",
                   help="spin compute: leave thread placement to the OS (default: the forward "
                        "thread gets one core, the transfer threads the others)")
    return p.parse_args(argv)


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from ..transfer import TransferEngine
    from .transfer_bench import run_transfer_bench, transfer_summary
    from . import scheduler_bench
    from .engine_sim import EngineConfig, run_engine

    quick = args.quick
    ops = args.ops or (4_000 if quick else 40_000)
    backend = args.backend
    if backend == "auto":
        with TransferEngine(None, backend="auto") as probe:
            backend = probe.backend
    result: dict[str, Any] = {"backend": backend, "device": _device(backend)}
    # Every section is timed: a refresh thread redrawing the spinner would compete for the GIL
    # with the Python paths being measured, so the progress line is redrawn between steps only.
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, auto_refresh=False) as progress:
        task = progress.add_task("scheduler: ops/s", total=None)
        progress.refresh()
        say = lambda msg: progress.update(task, description=msg, refresh=True)  # noqa: E731
        sched = scheduler_bench.ops_per_second(ops)
        say("scheduler: thread scaling")
        sched["threads"] = scheduler_bench.thread_scaling(ops // 2)
        sched["core_threads"] = scheduler_bench.core_thread_scaling(ops * 10)
        say("scheduler: dispatch latency")
        lat = scheduler_bench.dispatch_latency(iterations=50 if quick else 300)
        sched["ops"] = ops
        sched["dispatch_latency_us"] = {"p50": lat["p50"], "p99": lat["p99"]}
        result["scheduler"] = sched

        say("transfers")
        sizes = [4096, 65536, 1 << 20] if quick else [4096, 16384, 65536, 262144, 1 << 20, 2 << 20]
        tr = run_transfer_bench(backend=backend, block_sizes=sizes,
                                total_bytes=(16 if quick else 64) << 20,
                                repeats=2 if quick else 5, progress=lambda m: say(f"transfers: {m}"))
        summary = transfer_summary(tr, block_bytes=65536)
        result["transfer"] = {**summary, "rows": tr["rows"], "batched": tr.get("batched"),
                              "batch_mode": tr.get("batch_mode")}

    cfg = EngineConfig(layers=args.layers, iterations=args.iterations or (4 if quick else 24),
                       requests=args.requests, block_bytes=args.block_kib * 1024,
                       compute_per_layer_s=args.compute_ms / 1e3, backend=backend,
                       pin=not args.no_pin, rounds=1 if quick else 3)
    if backend == "cuda":
        modes = ["gpu"]  # a kernel on a compute stream (kvsched/bench/gpu_compute.py); --compute is for host
    else:
        modes = ["spin", "sleep"] if args.compute == "both" else [args.compute]
    # The engine passes likewise: redrawn between passes only.
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, auto_refresh=False) as progress:
        task = progress.add_task("engine", total=None)
        for mode in modes:
            cfg.compute = mode
            key = "engine" if mode == modes[0] else f"engine_{mode}"
            say = lambda msg, mode=mode: progress.update(  # noqa: E731
                task, description=f"engine ({mode}): {msg}", refresh=True)
            result[key] = run_engine(cfg, progress=say)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if Console is None:
        print(_NEEDS_RICH, file=sys.stderr)
        return 2
    console = Console()
    from ..transfer.errors import CudaError

    try:
        result = run(args, console)
    except CudaError as exc:  # e.g. --backend cuda on a machine without a usable GPU
        console.print(f"kvsched-bench: {exc}", style="red", markup=False)
        return 2
    from .report import print_report, write_json, write_plot

    print_report(result, console)
    if args.json:
        write_json(result, args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        write_plot(result, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
