"""kvsched-bench --quick runs end to end and writes the JSON keys of contract section 5
(docs/contract.md).

Figures must be positive and finite; their ratios are not checked here (speed belongs to
benchmarks, not to tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

KEYS = {
    "scheduler": {"ops", "core_ops_per_s", "python_ops_per_s", "reference_ops_per_s",
                  "dispatch_latency_us"},
    "transfer": {"block_bytes", "blocks", "peak_gbps", "kvsched_gbps", "per_block_gbps"},
    "engine": {"layers", "iterations", "compute_s", "transfer_s", "wall_s", "hidden_fraction"},
}


def test_quick_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "kvsched.bench", "--quick", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HandleDroppedError" not in proc.stderr
    data = json.loads(out.read_text())
    assert data["backend"] in ("host", "cuda")
    assert isinstance(data["device"], str) and data["device"]
    for section, keys in KEYS.items():
        assert keys <= set(data[section]), (section, keys - set(data[section]))
    s, t, e = data["scheduler"], data["transfer"], data["engine"]
    for v in (s["core_ops_per_s"], s["python_ops_per_s"], s["reference_ops_per_s"],
              s["dispatch_latency_us"]["p50"], s["dispatch_latency_us"]["p99"],
              t["peak_gbps"], t["kvsched_gbps"], t["per_block_gbps"],
              e["compute_s"], e["transfer_s"], e["wall_s"]):
        assert v > 0 and math.isfinite(v)
    assert isinstance(s["ops"], int) and s["ops"] > 0
    for key in ("threads", "core_threads"):  # thread scaling: 1, 2, 4 threads
        assert set(s[key]) == {"1", "2", "4"}, key
        assert all(v > 0 and math.isfinite(v) for v in s[key].values()), key
    assert t["block_bytes"] > 0 and t["blocks"] > 0
    assert e["layers"] > 0 and e["iterations"] > 0
    assert 0.0 <= e["hidden_fraction"] <= 1.0
    assert 0.0 <= e["steady_hidden_fraction"] <= 1.0
    assert {"total", "first_iteration_loads", "later_loads", "last_stores"} <= set(e["unhidden_s"])
    assert e["failed_ops"] == 0
    assert png.stat().st_size > 10_000  # a rendered figure, not an empty file


def test_cuda_without_a_gpu_is_a_clear_error():
    """--backend cuda where no device works: one line naming the reason, exit status 2, no
    traceback."""
    from kvsched.transfer.cudart import cuda_available

    if cuda_available()[0]:
        pytest.skip("a CUDA device is usable here")
    proc = subprocess.run([sys.executable, "-m", "kvsched.bench", "--backend", "cuda", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no usable CUDA device" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_without_rich_says_how_to_install_the_bench_extra():
    """rich is the ``bench`` extra: without it kvsched-bench names the install command and exits
    with status 2, and the rest of kvsched (the transfer benchmark included) imports without it."""
    code = ("import sys; sys.modules['rich'] = None\n"
            "import kvsched.bench.transfer_bench, kvsched.transfer\n"
            "from kvsched.bench.__main__ import main\n"
            "sys.exit(main(['--quick']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'pip install "kvsched[bench]"' in proc.stderr
