"""kvsched's nixl backend beside raw NIXL, on the same transfers in the same run.

A peer process holds a host pool registered with NIXL (through a kvsched engine, which exports
its description). This process moves scattered blocks to it (WRITE) and from it (READ):

* **raw**: one NIXL agent driven directly: per job, descriptor arrays built with numpy,
  ``initialize_xfer`` + ``transfer`` with a notification, then ``check_xfer_state`` until done,
  polled by the submitting thread with up to ``--window`` jobs in flight;
* **kvsched**: per job, a scheduler operation (enqueue + schedule, decided EXECUTE) and
  ``TransferEngine.submit`` (bounds checks, descriptors, posting); completion found by the
  engine's completion thread, which marks the handle; the caller waits on the oldest job when
  ``--window`` jobs are in flight.

Reported per block size and direction: throughput (GB/s) and host CPU time of this process per
job (every thread: the caller, kvsched's completion thread, NIXL's progress thread, which moves
the bytes over TCP and dominates), as ratios kvsched / raw; and the submitting thread's CPU per
job: raw, posting (descriptors, initialize_xfer, transfer); kvsched, enqueue + schedule + submit.
Raw NIXL is reaped with the same backoff as kvsched's completion thread. Rounds interleave the two; each figure is the best round.

    python bench/nixl_compare.py [--sizes 4096,65536,1048576] [--rounds 3] [--json FILE]

Needs NIXL (see docs/disaggregation.md); UCX over TCP on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
import uuid
from collections import deque

import numpy as np

os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

POOL_BYTES = 256 << 20


def _blocks_per_job(block: int) -> int:
    return int(min(512, max(4, (2 << 20) // block)))


def peer_main(conn, sizes, progress_thread):
    import kvsched

    eng = kvsched.TransferEngine(None, backend="nixl", agent_name="bench-peer", progress_thread=progress_thread)
    arrays, descs = [], {}
    for block in sizes:
        arr = np.random.default_rng(block).integers(0, 256, (1, POOL_BYTES // block, block), dtype=np.uint8)
        arrays.append(arr)
        descs[block] = eng.export_pool(kvsched.BlockPool.from_array(arr, block_dim=1))
    conn.send(descs)
    conn.recv()  # until the bench is done
    eng.close(timeout=10)


class Raw:
    """The same transfers through NIXL's API directly."""

    def __init__(self, descs, progress_thread):
        from nixl import _api

        self.agent = _api.nixl_agent("bench-raw", _api.nixl_agent_config(enable_prog_thread=progress_thread,
                                                                          backends=["UCX"]))
        self.remote = {}
        for block, desc in descs.items():
            d = json.loads(desc)
            import base64

            self.peer = self.agent.add_remote_agent(base64.b64decode(d["metadata"])).decode()
            self.remote[block] = d["layer_ptrs"][0]
        self.local = {}

    def register(self, block, arr):
        self.agent.register_memory([(arr.ctypes.data, arr.nbytes, 0, "")], "DRAM")
        self.local[block] = arr.ctypes.data

    def run(self, block, op, jobs, window):
        agent = self.agent
        self.post_cpu = 0.0
        inflight = deque()
        for src_ids, dst_ids in jobs:
            if op == "WRITE":
                loc_ids, rem_ids = src_ids, dst_ids
            else:
                loc_ids, rem_ids = dst_ids, src_ids
            c0 = time.thread_time()
            n = loc_ids.size
            loc = np.empty((n, 3), dtype=np.uint64)
            rem = np.empty((n, 3), dtype=np.uint64)
            loc[:, 0] = self.local[block] + loc_ids * block
            rem[:, 0] = self.remote[block] + rem_ids * block
            loc[:, 1] = rem[:, 1] = block
            loc[:, 2] = rem[:, 2] = 0
            h = agent.initialize_xfer(op, agent.get_xfer_descs(loc, "DRAM"), agent.get_xfer_descs(rem, "DRAM"),
                                      self.peer, b"kvsched1 " + uuid.uuid4().hex.encode() + b" ok 0")
            state = agent.transfer(h)
            self.post_cpu += time.thread_time() - c0
            inflight.append((h, state))
            while len(inflight) >= window:
                self._reap(inflight)
        while inflight:
            self._reap(inflight)

    def _reap(self, inflight):
        # Polled with the backoff kvsched's completion thread uses (20 us doubling to 2 ms): a
        # busy loop would burn a core and make raw NIXL's CPU per job look worse than it is.
        h, state = inflight[0]
        delay = 20e-6
        while state == "PROC":
            time.sleep(delay)
            delay = min(delay * 2, 2e-3)
            state = self.agent.check_xfer_state(h)
        if state != "DONE":
            raise RuntimeError(f"raw NIXL transfer ended {state}")
        self.agent.release_xfer_handle(h)
        inflight.popleft()


class Kvsched:
    def __init__(self, descs, progress_thread):
        import kvsched

        self.kvsched = kvsched
        self.sched = kvsched.Scheduler(max_inflight=1 << 16)
        self.sched.worker.create_slot("bench")
        self.eng = kvsched.TransferEngine(self.sched, backend="nixl", agent_name="bench-kvsched",
                                          progress_thread=progress_thread)
        self.remote = {block: self.eng.import_pool(desc) for block, desc in descs.items()}
        self.local = {}

    def register(self, block, arr):
        pool = self.kvsched.BlockPool.from_array(arr, block_dim=1)
        self.eng.export_pool(pool, with_metadata=False)  # registers it
        self.local[block] = pool

    def run(self, block, op, jobs, window):
        from kvsched import TransferKind

        w, t = self.sched.worker, self.sched.transfer
        local, remote = self.local[block], self.remote[block]
        src, dst = (local, remote) if op == "WRITE" else (remote, local)
        inflight = deque()
        self.post_cpu = 0.0
        for src_ids, dst_ids in jobs:
            c0 = time.thread_time()
            u = uuid.uuid4()
            w.enqueue("bench", u, TransferKind.STORE)
            h = t.schedule("bench", u)
            inflight.append(self.eng.submit(h, src, dst, np.stack([src_ids, dst_ids], axis=1)))
            self.post_cpu += time.thread_time() - c0
            while len(inflight) >= window:
                job = inflight.popleft()
                job.wait()
                if not job.ok:
                    raise RuntimeError(job.error)
        for job in inflight:
            job.wait()
            if not job.ok:
                raise RuntimeError(job.error)
        w.take_finished()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--jobs", type=int, default=48, help="jobs per measurement")
    ap.add_argument("--window", type=int, default=8, help="jobs in flight")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--progress-thread", choices=("on", "off"), default="off",
                    help="NIXL's progress thread in every agent (on: it spins a core per agent)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    prog = args.progress_thread == "on"
    peer = ctx.Process(target=peer_main, args=(child, sizes, prog), daemon=True)
    peer.start()
    descs = conn.recv()
    raw, ours = Raw(descs, prog), Kvsched(descs, prog)
    rng = np.random.default_rng(1)
    results = []
    try:
        for block in sizes:
            nblocks = POOL_BYTES // block
            raw_arr = np.ones((1, nblocks, block), dtype=np.uint8)
            our_arr = np.ones((1, nblocks, block), dtype=np.uint8)
            raw.register(block, raw_arr)
            ours.register(block, our_arr)
            per_job = _blocks_per_job(block)
            jobs = [(rng.choice(nblocks, per_job, replace=False).astype(np.int64),
                     rng.choice(nblocks, per_job, replace=False).astype(np.int64)) for _ in range(args.jobs)]
            nbytes = args.jobs * per_job * block
            for op in ("WRITE", "READ"):
                best = {"raw": [0.0, float("inf"), float("inf")], "kvsched": [0.0, float("inf"), float("inf")]}
                for name, side in (("raw", raw), ("kvsched", ours)):  # warm-up: connections, caches
                    side.run(block, op, jobs[:4], args.window)
                for _ in range(args.rounds):
                    for name, side in (("raw", raw), ("kvsched", ours)):
                        c0, t0 = time.process_time(), time.perf_counter()
                        side.run(block, op, jobs, args.window)
                        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                        best[name][0] = max(best[name][0], nbytes / wall / 1e9)
                        best[name][1] = min(best[name][1], cpu / args.jobs * 1e6)
                        best[name][2] = min(best[name][2], side.post_cpu / args.jobs * 1e6)
                row = {"block_bytes": block, "op": op, "blocks_per_job": per_job, "jobs": args.jobs,
                       "raw_gbps": best["raw"][0], "kvsched_gbps": best["kvsched"][0],
                       "raw_cpu_us_per_job": best["raw"][1], "kvsched_cpu_us_per_job": best["kvsched"][1],
                       "raw_post_cpu_us_per_job": best["raw"][2], "kvsched_post_cpu_us_per_job": best["kvsched"][2]}
                row["throughput_ratio"] = row["kvsched_gbps"] / row["raw_gbps"]
                row["cpu_ratio"] = row["kvsched_cpu_us_per_job"] / row["raw_cpu_us_per_job"]
                results.append(row)
                print(f"{block:>8} B x{per_job:<4} {op:<5}  raw {row['raw_gbps']:6.2f} GB/s "
                      f"{row['raw_cpu_us_per_job']:8.1f} us CPU/job   kvsched {row['kvsched_gbps']:6.2f} GB/s "
                      f"{row['kvsched_cpu_us_per_job']:8.1f} us CPU/job   throughput x{row['throughput_ratio']:.3f}"
                      f"  CPU x{row['cpu_ratio']:.2f}   caller CPU/job: raw {row['raw_post_cpu_us_per_job']:.0f} us, "
                      f"kvsched {row['kvsched_post_cpu_us_per_job']:.0f} us", flush=True)
    finally:
        conn.send("done")
        ours.eng.close(timeout=10)
        peer.join(20)
    if args.json:
        from nixl import __file__ as nixl_file  # noqa: F401 - the version is read below

        try:
            from importlib.metadata import version

            nixl_version = version("nixl")
        except Exception:  # noqa: BLE001
            nixl_version = "unknown"
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "nixl": nixl_version, "transport": os.environ.get("UCX_TLS"),
                       "window": args.window, "rounds": args.rounds, "progress_thread": args.progress_thread,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
