"""Output of kvsched-bench: rich tables on the terminal, the JSON of contract section 5
(docs/contract.md), the PNG."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table


def _f(x: float, unit: str = "") -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M{unit}"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k{unit}"
    return f"{x:.2f}{unit}"


def print_report(result: dict[str, Any], console: Console) -> None:
    s = result["scheduler"]
    t = Table(title=f"scheduler ({result['device']})", show_lines=False)
    t.add_column("path")
    t.add_column("ops/s", justify="right")
    t.add_column("vs reference", justify="right")
    ref = s["reference_ops_per_s"]
    for name, key in (("C++ core alone", "core_ops_per_s"), ("Python API", "python_ops_per_s"),
                      ("Python API, batched calls", "python_batch_ops_per_s"),
                      ("reference model (pure Python)", "reference_ops_per_s")):
        t.add_row(name, _f(s[key]), f"{s[key] / ref:.1f}x")
    for n, v in s.get("threads", {}).items():
        t.add_row(f"Python API, {n} thread(s)", _f(v), f"{v / ref:.1f}x")
    for n, v in s.get("core_threads", {}).items():  # no GIL: the core's own locks and atomics
        t.add_row(f"C++ core alone, {n} thread(s)", _f(v), f"{v / ref:.1f}x")
    console.print(t)
    lat = s["dispatch_latency_us"]
    console.print(f"layer-complete -> decision latency (core): p50 {lat['p50']:.1f} us, "
                  f"p99 {lat['p99']:.1f} us")

    tr = result["transfer"]
    # Short headers, each on two lines, so the table fits an 80-column terminal untruncated.
    mode = tr.get("batch_mode")
    t = Table(title=f"transfers ({result['backend']} backend{f', batches: {mode}' if mode else ''}): "
                    "scattered blocks, GB/s")
    # With the cuda backend's C-array batches, the same engine batching through cuda-bindings'
    # Python lists is measured too ("lists").
    lists = any("bindings_gbps" in row for row in tr.get("rows", []))
    for col in ("dir", "block", "blocks", "peak\n(1 copy)", "kvsched", "per-block\nloop",
                "kvsched\n/ peak", "kvsched\n/ loop") + (("lists",) if lists else ()):
        t.add_column(col, justify="right")
    for row in tr.get("rows", []):
        cells = [row["direction"], _size(row["block_bytes"]), str(row["blocks"]),
                 f"{row['peak_gbps']:.2f}", f"{row['kvsched_gbps']:.2f}",
                 f"{row['per_block_gbps']:.2f}", f"{row['kvsched_gbps'] / row['peak_gbps']:.2f}",
                 f"{row['kvsched_gbps'] / row['per_block_gbps']:.2f}"]
        if lists:
            cells.append(f"{row['bindings_gbps']:.2f}" if "bindings_gbps" in row else "-")
        t.add_row(*cells)
    console.print(t)

    for key in ("engine", "engine_sleep", "engine_spin"):
        if key in result:
            _engine_table(result[key], console)


def _engine_table(e: dict[str, Any], console: Console) -> None:
    t = Table(title=f"engine simulation (compute: {e.get('compute_mode', 'spin')})")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("layers x iterations x requests", f"{e['layers']} x {e['iterations']} x {e['requests']}")
    t.add_row("compute only (s)", f"{e['compute_s']:.3f}")
    t.add_row("transfers only (s)", f"{e['transfer_s']:.3f}")
    t.add_row("both (s)", f"{e['wall_s']:.3f}")
    t.add_row("transfer time hidden, whole run", f"{100 * e['hidden_fraction']:.0f} %")
    if len(e.get("hidden_fraction_per_round", [])) > 1:
        t.add_row("  each round on its own", " / ".join(f"{100 * f:.0f}" for f in e["hidden_fraction_per_round"]) + " %")
    if "steady_hidden_fraction" in e:
        t.add_row(f"transfer time hidden, steady state (iterations 2..{e['iterations'] - 1})",
                  f"{100 * e['steady_hidden_fraction']:.0f} %")
    u = e.get("unhidden_s")
    if u:  # where wall - compute went
        t.add_row("unhidden: both - compute only (ms)", f"{1e3 * u['total']:.1f}")
        for key, label in (("first_iteration_loads", "first iteration's loads (cold start)"),
                           ("later_loads", "later loads"), ("last_stores", "last layer's stores"),
                           ("compute_stretch", "layers slower than in compute only"),
                           ("other", "other forward-thread work")):
            t.add_row(f"  {label}", f"{1e3 * u[key]:.1f}")
    gaps = e.get("gpu_idle_between_layers_s")
    if gaps:  # cuda: the compute stream waiting for loads shows as idle time between kernels
        t.add_row("GPU idle between layers: compute only / with transfers (ms)",
                  f"{1e3 * gaps['compute_only']:.1f} / {1e3 * gaps['with_transfers']:.1f}")
    if "forward_thread_pinned" in e and e.get("compute_mode") == "spin":
        t.add_row("forward thread on a core of its own", "yes" if e["forward_thread_pinned"] else "no")
    if e.get("other_processes_cpu") is not None:
        t.add_row("CPU used by other processes meanwhile", f"{100 * e['other_processes_cpu']:.0f} %")
    t.add_row("ops / failed", f"{e['ops']} / {e['failed_ops']}")
    t.add_row("mark -> executor handoff p50 / p99 (us)",
              f"{e['handoff_latency_us']['p50']:.0f} / {e['handoff_latency_us']['p99']:.0f}")
    console.print(t)
    if (e.get("other_processes_cpu") or 0) > 0.1:
        console.print(f"[yellow]other processes used {100 * e['other_processes_cpu']:.0f} % of the "
                      "CPU during these passes: the figures above are disturbed, rerun when idle[/]")


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n < 1 << 20 else f"{n // (1 << 20)} MiB"


def write_json(result: dict[str, Any], path: str) -> None:
    data = {k: v for k, v in result.items()}
    for key in ("engine", "engine_sleep", "engine_spin"):
        if key in result:
            data[key] = {k: v for k, v in result[key].items() if k != "timeline"}
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_plot(result: dict[str, Any], path: str) -> None:
    """Bandwidth against block size, and the overlap timeline of the engine simulation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional extra
        raise SystemExit(f"--plot needs matplotlib: pip install 'kvsched[plot]' ({exc})")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    rows = result["transfer"].get("rows", [])
    for direction in sorted({r["direction"] for r in rows}):
        rs = sorted((r for r in rows if r["direction"] == direction), key=lambda r: r["block_bytes"])
        xs = [r["block_bytes"] / 1024 for r in rs]
        for key, style, label in (("peak_gbps", "--", "contiguous peak"),
                                  ("kvsched_gbps", "-o", "kvsched"),
                                  ("bindings_gbps", "-.+", "kvsched, batches as Python lists"),
                                  ("per_block_gbps", ":x", "one copy per block")):
            if all(key in r for r in rs):
                ax1.plot(xs, [r[key] for r in rs], style, label=f"{direction}: {label}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("block size (KiB)")
    ax1.set_ylabel("GB/s")
    ax1.set_title(f"scattered block copies ({result['backend']})")
    ax1.legend(fontsize=7)
    tl = result["engine"]["timeline"]
    for y, (name, spans, color) in enumerate((("compute", tl.compute, "tab:blue"),
                                             ("loads", tl.loads, "tab:green"),
                                             ("stores", tl.stores, "tab:orange"))):
        ax2.broken_barh([(a, max(b - a, 1e-5)) for a, b in spans], (y - 0.4, 0.8), color=color)
    ax2.set_yticks([0, 1, 2], ["compute", "loads", "stores"])
    ax2.set_xlabel("seconds")
    e = result["engine"]
    ax2.set_title(f"engine timeline: {100 * e['hidden_fraction']:.0f}% of transfer time hidden")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
