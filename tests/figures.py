"""Figures of test runs, shared by tests/model, tests/concurrency and tests/scenarios (imported as
a plain module: tests/ is on sys.path because tests/conftest.py lives there).

``STRESS`` is the tier (``KVSCHED_STRESS``: ``ci`` by default, ``long`` on demand).
``write_report`` prints a run's figures and, when ``KVSCHED_REPORT`` is set, also writes them as
JSON (``KVSCHED_REPORT=1``: under ``build/test-reports/``; any other value: that folder).
"""

from __future__ import annotations

import json
import os
import pathlib

STRESS = os.environ.get("KVSCHED_STRESS", "ci").lower()
REPO = pathlib.Path(__file__).resolve().parents[1]


def write_report(name: str, figures: dict) -> None:
    data = {"stress": STRESS, **figures}
    print(f"\n[kvsched figures] {name}: {json.dumps(data, sort_keys=True, default=str)}")
    target = os.environ.get("KVSCHED_REPORT")
    if not target:
        return
    d = REPO / "build" / "test-reports" if target.lower() in ("1", "true", "yes", "on") \
        else pathlib.Path(target)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
