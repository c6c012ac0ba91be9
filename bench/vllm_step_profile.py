"""Where a connector's worker-side CPU goes, per kind of engine step.

Runs one connector of ``bench/vllm_compare.py`` (same trace, same harness) and splits the
worker hooks' thread CPU time by step kind: steps with neither stores nor loads (most decode
steps), with stores, with loads, with both. Per kind it prints the steps, the CPU per step and
the hooks that cost most. ``get_transfer_results`` is left out (it calls ``get_finished``, which
is counted); the figures are therefore a little below ``vllm_compare.py``'s.

It also measures how slow the forward thread's code runs right after the model's layer work:
a fixed pure-Python workload timed just before the connector's ``save_kv_layer`` of the last
layer, against the same workload run hot. The hooks run when the CPU caches hold the model's
tensors, not the connector's code and objects, so a hook costs several times what it costs in a
loop on its own: what counts there is how much distinct code and data a hook touches.

Usage: ``python bench/vllm_step_profile.py [kvsched|vllm] [--layers 3] [--rounds 3]`` in an
environment with vLLM (see ``tests/vllm/ci.sh``).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_compare as V  # noqa: E402

from kvsched.vllm import harness as H  # noqa: E402

_HOOKS = tuple(n for n in V.WORKER_HOOKS if n != "get_transfer_results")


def _workload() -> int:
    d = {}
    for i in range(50):
        d[i] = i
    return sum(d.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("connector", choices=("kvsched", "vllm"))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3, help="runs; the one with the least worker CPU is shown")
    args = ap.parse_args(argv)
    H.LAYERS = args.layers
    block_bytes = H.spec().page_size_bytes * H.LAYERS
    host_bytes = 48 * block_bytes
    configs = {name: cfg for name, *cfg in V.connector_configs(host_bytes)}
    name = "kvsched async" if args.connector == "kvsched" else "vLLM OffloadingConnector"
    cfg: tuple[Any, ...] = (name, *configs[name])

    current: dict[str, float] = collections.defaultdict(float)
    rows: list[tuple[str, dict[str, float]]] = []
    cold: list[float] = []
    last_layer = H.layer_names()[-1]
    wrap = V.Timed.wrap

    def timed_wrap(self: Any, obj: Any, names: tuple[str, ...]) -> None:
        if names is V.WORKER_HOOKS:
            for name in _HOOKS:
                fn = getattr(obj, name, None)
                if fn is None:
                    continue

                def hook(*a: Any, __fn: Any = fn, __name: str = name, **k: Any) -> Any:
                    if __name == "save_kv_layer" and a and a[0] == last_layer:
                        t = time.thread_time()
                        _workload()
                        cold.append(time.thread_time() - t)
                    t0 = time.thread_time()
                    try:
                        return __fn(*a, **k)
                    finally:
                        current[__name] += time.thread_time() - t0

                setattr(obj, name, hook)
        wrap(self, obj, names)

    engine_step = H.Engine.step

    def step(self: Any, **k: Any) -> Any:
        so = engine_step(self, **k)
        meta = so.kv_connector_metadata
        plan = getattr(meta, "plan", None)
        if plan is not None:  # kvsched
            stores, loads = plan.stores, plan.loads
        else:  # vLLM's OffloadingConnectorMetadata
            stores, loads = getattr(meta, "store_jobs", None), getattr(meta, "load_jobs", None)
        rows.append((("stores" if stores else "") + ("+" if stores and loads else "") + ("loads" if loads else "")
                     or "idle", dict(current)))
        current.clear()
        return so

    V.Timed.wrap = timed_wrap
    H.Engine.step = step
    waves = V.trace(args.requests, 0)
    best: tuple[float, list[Any], list[float]] | None = None
    for _ in range(args.rounds):
        rows.clear()
        cold.clear()
        V.run(*cfg, waves, 256)
        total = sum(sum(d.values()) for _, d in rows)
        if best is None or total < best[0]:
            best = (total, list(rows), list(cold))
    assert best is not None
    total, rows, cold = best
    for _ in range(2000):
        _workload()
    t = time.thread_time()
    for _ in range(1000):
        _workload()
    hot_us = (time.thread_time() - t) * 1e3
    print(f"{cfg[0]}, {args.layers} layers: {len(rows)} steps, worker hooks {1e6 * total / len(rows):.1f} us/step "
          f"(best of {args.rounds})")
    kinds: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    for kind, d in rows:
        kinds[kind].append(d)
    for kind in ("idle", "stores", "loads", "stores+loads"):
        ds = kinds.get(kind)
        if not ds:
            continue
        per: dict[str, float] = collections.defaultdict(float)
        for d in ds:
            for name, v in d.items():
                per[name] += v
        top = sorted(per.items(), key=lambda x: -x[1])[:5]
        print(f"  {kind:13} {len(ds):4d} steps {1e6 * sum(per.values()) / len(ds):7.1f} us/step   "
              + ", ".join(f"{name} {1e6 * v / len(ds):.0f}" for name, v in top))
    if cold:
        cold.sort()
        print(f"  fixed workload: {hot_us:.1f} us hot, {1e6 * cold[len(cold) // 2]:.1f} us (median of {len(cold)}) "
              f"just before the last layer's save_kv_layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
