"""bench/asyncio_wait.py runs end to end at tiny sizes and writes its JSON keys.

Figures must be finite and positive where they are times; whether the aims are met is not checked
here (speed belongs to the benchmark, not to tests). That close() resolves every awaiting
coroutine is checked: the benchmark exits 1 otherwise."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "asyncio_wait.py"
SIZES = (20, 50)


def test_tiny_run_json(tmp_path):
    out = tmp_path / "aw.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", ",".join(map(str, SIZES)), "--idle", "0.2",
         "--samples", "40", "--bg-samples", "20", "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for heading in ("(a) CPU", "(b) decision -> await resumed", "(c) close()", "aims:"):
        assert heading in proc.stdout, heading
    data = json.loads(out.read_text())
    assert {"idle_cpu", "latency_us", "close", "verdicts", "aims", "wall_s", "config"} <= set(data)
    assert set(data["idle_cpu"]) == {str(n) for n in SIZES}
    for r in data["idle_cpu"].values():
        assert {"kvsched_pct", "future_pct", "excess_pct"} <= set(r)
        assert r["kvsched_pct"] >= 0 and r["future_pct"] >= 0
    assert set(data["latency_us"]) == {"background_0", f"background_{max(SIZES)}"}
    for r in data["latency_us"].values():
        for kind in ("kvsched", "future"):
            s = r[kind]
            assert {"p50", "p99", "mean", "max", "n"} <= set(s)
            assert s["n"] > 0 and 0 < s["p50"] <= s["p99"] and math.isfinite(s["p99"])
        assert r["p99_ratio"] > 0 and math.isfinite(r["p99_ratio"])
    for n, r in data["close"].items():
        assert r["resolved"] == int(n) and r["unresolved"] == 0 and r["errors"] == 0
        assert 0 < r["kvsched_s"] < 10 and 0 < r["future_s"] < 10
    v = data["verdicts"]
    assert set(v) == {"idle_cpu", "latency", "close"} and v["close"]["met"] is True
    assert all(isinstance(x["met"], bool) for x in v.values())
