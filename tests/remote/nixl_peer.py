"""A peer process for the NIXL tests: its own Scheduler, nixl TransferEngine and host pool,
driven over a multiprocessing pipe by the test (the other process).

Commands are tuples ``(name, *args)``; every reply is ``("ok", value)`` or ``("error", text)``.
"""

from __future__ import annotations

import os
import traceback
import uuid
from typing import Any

import numpy as np


def pool_array(layers: int, blocks: int, block_bytes: int, seed: int) -> np.ndarray:
    """The bytes a peer's pool starts with: random, reproducible from ``seed`` (0: zeros)."""
    if seed == 0:
        return np.zeros((layers, blocks, block_bytes), dtype=np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (layers, blocks, block_bytes), dtype=np.uint8)


def serve(conn: Any, name: str, options: dict[str, Any]) -> None:
    os.environ.setdefault("UCX_TLS", "tcp")
    import kvsched
    from kvsched import TransferKind

    sched = kvsched.Scheduler(max_inflight=1 << 16)
    eng = kvsched.TransferEngine(sched, backend="nixl", agent_name=name, **options)
    arrays: dict[str, np.ndarray] = {}
    pools: dict[str, Any] = {}
    remotes: dict[str, Any] = {}
    jobs: dict[str, Any] = {}
    handles: dict[str, Any] = {}
    sched.worker.create_slot("peer")

    def op(u: str, kind: Any) -> Any:
        sched.worker.enqueue("peer", u, kind)
        h = sched.transfer.schedule("peer", u)
        h.wait(5)
        handles[u] = h
        return h

    while True:
        msg = conn.recv()
        cmd, args = msg[0], msg[1:]
        try:
            if cmd == "pool":  # (key, layers, blocks, block_bytes, seed) -> description
                key, layers, blocks, block_bytes, seed = args
                arrays[key] = pool_array(layers, blocks, block_bytes, seed)
                pools[key] = kvsched.BlockPool.from_array(arrays[key], block_dim=1)
                value: Any = eng.export_pool(pools[key])
            elif cmd == "import":  # (key, description)
                remotes[args[0]] = eng.import_pool(args[1])
                value = remotes[args[0]].num_blocks
            elif cmd == "expect":  # (uuid, peer, timeout): the other side of the test's transfer
                u, peer, timeout = args
                jobs[u] = eng.expect_remote(op(u, TransferKind.LOAD), peer=peer, timeout=timeout)
                value = None
            elif cmd == "result":  # (uuid, wait_s) -> (done, error)
                job = jobs[args[0]]
                job.wait(args[1])
                value = (job.done(), job.error)
            elif cmd == "blocks":  # (key, layer, ids) -> bytes of those blocks
                key, layer, ids = args
                value = arrays[key][layer, list(ids)].tobytes()
            elif cmd == "write":  # (key_local, key_remote, pairs, layers) -> uuid; the peer initiates
                key, rkey, pairs, layers = args
                u = str(uuid.uuid4())
                jobs[u] = eng.submit(op(u, TransferKind.STORE), pools[key], remotes[rkey], pairs, layers)
                value = u
            elif cmd == "stats":
                value = eng.stats()
            elif cmd == "die":
                os._exit(3)
            elif cmd == "exit":
                eng.close(timeout=10)
                sched.close()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", value))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
