"""Host backend: process CPU per small job, handed to a copy thread (inline_bytes=0) or copied on
the submitting thread (inline_bytes=1 MiB), the submitting thread releasing the GIL between jobs
as an engine's forward thread does: `python bench/host_inline.py 0` and `... 1048576`."""

import sys
import time
import uuid

import numpy as np

import kvsched
from kvsched import BlockPool, TransferEngine, TransferKind, _bench


def main(inline: int, jobs: int = 3000) -> None:
    s = kvsched.Scheduler(max_inflight=1 << 20)
    a = np.zeros((1, 64, 2, 16, 8, 64), dtype=np.float16)  # 32 KiB blocks
    b = np.zeros_like(a)
    pa, pb = BlockPool.from_array(a), BlockPool.from_array(b)
    eng = TransferEngine(s, backend="host", inline_bytes=inline)
    w, t = s.worker, s.transfer
    w.create_slot("r")
    handles = []
    for _ in range(jobs):
        u = uuid.uuid4()
        w.enqueue("r", u, TransferKind.STORE)
        h = t.schedule("r", u)
        assert h.decision is not None
        handles.append(h)
    # One job at a time, as a forward thread submits per layer: submit, then 100 us of work with
    # the GIL released (the copy threads can run meanwhile).
    submit_cpu = 0.0
    p0 = time.process_time()
    for h in handles:
        c0 = time.thread_time()
        eng.submit(h, pa, pb, [(1, 2), (3, 4), (5, 6)])
        submit_cpu += time.thread_time() - c0
        _bench.spin(100e-6)
    eng.wait_idle(10)
    proc = time.process_time() - p0
    print(f"inline_bytes={inline}: submitting thread CPU {submit_cpu / jobs * 1e6:.1f} us/job; "
          f"whole process CPU {proc / jobs * 1e6:.1f} us/job (including the 100 us of work)")
    eng.close(10)
    s.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
