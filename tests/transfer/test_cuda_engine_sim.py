"""kvsched-bench's engine simulation on the cuda backend, run on a CPU-only machine: the transfer
engine on the stand-in runtime and driver (fake_cudart.py), the compute stream replaced by a
recorder with the same methods as bench.gpu_compute.GpuCompute. What is checked is the engine's
side of GPU ordering: the compute stream is told to wait for every load before the layer that
reads it, every store carries the event recorded after its layer, the forward thread synchronises
once per iteration and never waits for a copy on the CPU. The GPU itself is test_cuda_backend's
and bench/gpu_check.sh's business."""

from __future__ import annotations

import threading
import time

import pytest
from fake_cudart import FakeDriver, FakeRuntime

from kvsched.bench.engine_sim import EngineConfig, run_engine

pytestmark = pytest.mark.timeout(120)


class RecordingCompute:
    """GpuCompute's interface; layers sleep on the CPU, everything is logged in order."""

    def __init__(self, rt: FakeRuntime, log: list) -> None:
        self.rt, self.log = rt, log
        self.stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)[1]
        self.thread = threading.get_ident()
        self._spans: list[tuple[float, float]] = []
        self._t0 = 0.0

    def _on_forward_thread(self) -> None:
        assert threading.get_ident() == self.thread, "compute stream used from another thread"

    def start_pass(self, layers: int = 0) -> None:
        self._spans, self._t0 = [], time.perf_counter()
        self.log.append(("start",))

    def wait_for(self, job) -> None:
        self._on_forward_thread()
        assert job is not None
        self.log.append(("wait_for", job.uuid))
        job.wait_on(self.stream)

    def layer(self, seconds: float) -> None:
        self._on_forward_thread()
        a = time.perf_counter() - self._t0
        time.sleep(seconds)
        self._spans.append((a, time.perf_counter() - self._t0))
        self.log.append(("layer",))

    def record(self):
        self._on_forward_thread()
        event = self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming)[1]
        self.rt.cudaEventRecord(event, self.stream)
        self.log.append(("record", int(event)))
        return event

    def synchronize(self) -> None:
        self.log.append(("sync",))

    def layer_spans(self):
        return list(self._spans)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.log.append(("close",))


def test_cuda_engine_simulation_orders_copies_on_the_gpu(monkeypatch):
    rt = FakeRuntime(not_ready_polls=1)
    drv = FakeDriver(rt)
    log: list = []
    layers, iterations, requests = 3, 4, 2
    cfg = EngineConfig(layers=layers, iterations=iterations, requests=requests, blocks_per_layer=2,
                       block_bytes=4096, compute_per_layer_s=0.002, backend="cuda", compute="gpu", rounds=1,
                       transfer_options={"runtime": rt, "driver": drv, "poll_interval": (1e-5, 1e-4)},
                       gpu_factory=lambda: RecordingCompute(rt, log))
    # Every job the executor submits, with the compute_event it was given.
    from kvsched.transfer.engine import TransferEngine

    submitted = []
    real_submit = TransferEngine.submit

    def spy(self, h, *args, compute_event=None, **kwargs):
        job = real_submit(self, h, *args, compute_event=compute_event, **kwargs)
        submitted.append((job, compute_event))
        return job

    monkeypatch.setattr(TransferEngine, "submit", spy)
    # The forward thread (this one) must not wait for a copy on the CPU during the iterations; it
    # waits for the last stores once the loop is over (the drain).
    from kvsched.transfer.job import TransferJob

    forward, real_wait = threading.get_ident(), TransferJob.wait

    def wait_spy(self, *args, **kwargs):
        if threading.get_ident() == forward:
            log.append(("cpu_wait", self.kind))
        return real_wait(self, *args, **kwargs)

    monkeypatch.setattr(TransferJob, "wait", wait_spy)
    result = run_engine(cfg)
    assert drv.errors == []
    assert result["failed_ops"] == 0 and result["errors"] == []
    assert result["ops"] == 2 * layers * iterations * requests
    assert result["compute_mode"] == "gpu"
    assert 0.0 <= result["hidden_fraction"] <= 1.0
    gaps = result["gpu_idle_between_layers_s"]
    assert gaps["compute_only"] >= 0 and gaps["with_transfers"] >= 0

    # The last pass (compute + transfers): its log starts at the last "start".
    last = max(i for i, entry in enumerate(log) if entry[0] == "start")
    events = [entry for entry in log[last:] if entry[0] != "start"]
    assert [e[0] for e in events].count("layer") == layers * iterations
    assert [e[0] for e in events].count("sync") == iterations  # once per iteration
    recorded = [e[1] for e in events if e[0] == "record"]
    assert len(recorded) == layers * iterations

    jobs = submitted[-result["ops"]:]  # the both-pass's jobs
    loads = [(job, ev) for job, ev in jobs if job.kind == "h2d"]
    stores = [(job, ev) for job, ev in jobs if job.kind == "d2h"]
    assert len(loads) == len(stores) == layers * iterations * requests
    # Loads need no compute event; each store carries the event recorded after its own layer of
    # its own iteration (recorded in order: iteration 1 layers 0..L-1, then iteration 2, ...).
    assert all(ev is None for _, ev in loads)
    for job, ev in stores:
        it = int(job.request_id.rsplit("-it", 1)[1])
        (layer,) = job.plan.layer_list
        assert int(ev) == recorded[(it - 1) * layers + layer], (job.request_id, layer)
    cpu_waits = [i for i, e in enumerate(events) if e[0] == "cpu_wait"]
    last_sync = max(i for i, e in enumerate(events) if e[0] == "sync")
    assert cpu_waits and min(cpu_waits) > last_sync, "the forward thread waited for a copy mid-run"
    # The copy stream was told to wait on those events before copying (on the GPU).
    assert set(recorded) <= {event for _, event in rt.waits}
    # The compute stream is told to wait for each layer's loads before that layer's kernel: in the
    # log, the waits of a layer come between the previous layer and its own.
    waited = [e[1] for e in events if e[0] == "wait_for"]
    assert sorted(map(str, waited)) == sorted(str(job.uuid) for job, _ in loads)
    per_layer, run = [], 0
    for e in events:
        if e[0] == "wait_for":
            run += 1
        elif e[0] == "layer":
            per_layer.append(run)
            run = 0
    assert per_layer == [requests] * (layers * iterations)


def test_compute_mode_must_match_the_backend():
    with pytest.raises(ValueError, match="GPU kernel"):
        run_engine(EngineConfig(backend="host", compute="gpu"))
    with pytest.raises(ValueError, match="GPU kernel"):
        run_engine(EngineConfig(backend="cuda", compute="spin"))


def test_cuda_results_render_as_table_json_and_plot(tmp_path):
    """kvsched-bench's report of a cuda run (the "lists" column, the GPU idle time between layers,
    no pinning row), from results made on the stand-ins."""
    import io
    import json

    from rich.console import Console

    from kvsched.bench import scheduler_bench
    from kvsched.bench.report import print_report, write_json, write_plot
    from kvsched.bench.transfer_bench import run_transfer_bench, transfer_summary

    rt = FakeRuntime(not_ready_polls=1)
    options = {"runtime": rt, "driver": FakeDriver(rt), "poll_interval": (1e-5, 1e-4)}
    sched = scheduler_bench.ops_per_second(400, rounds=1)
    sched["dispatch_latency_us"] = {"p50": 1.0, "p99": 2.0}
    sched["ops"] = 400
    tr = run_transfer_bench(backend="cuda", block_sizes=[4096, 65536], total_bytes=1 << 19, repeats=1, **options)
    log: list = []
    engine = run_engine(EngineConfig(layers=2, iterations=3, requests=1, blocks_per_layer=2, block_bytes=4096,
                                     compute_per_layer_s=0.001, backend="cuda", compute="gpu", rounds=1,
                                     transfer_options=options, gpu_factory=lambda: RecordingCompute(rt, log)))
    result = {"backend": "cuda", "device": "stand-in", "scheduler": sched,
              "transfer": {**transfer_summary(tr, 65536), "rows": tr["rows"], "batch_mode": tr["batch_mode"]},
              "engine": engine}
    out = io.StringIO()
    print_report(result, Console(file=out, width=120))
    text = out.getvalue()
    assert "batches: driver" in text and "lists" in text
    assert "GPU idle between layers" in text and "compute: gpu" in text
    assert "core of its own" not in text  # pinning is a spin-compute matter
    write_json(result, str(tmp_path / "r.json"))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["engine"]["gpu_idle_between_layers_s"]["with_transfers"] >= 0
    assert all("bindings_gbps" in row for row in data["transfer"]["rows"])
    write_plot(result, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 10_000
