"""Helpers of the differential model test (imported as a plain module: pytest puts tests/model on
sys.path). Only public API is used.

Figures (examples, steps, bad inputs tried...) are collected in ``FIGURES`` while the tests run
and written by ``write_report`` (tests/figures.py).
"""

from __future__ import annotations

import collections
import re

from figures import STRESS, write_report  # noqa: F401 (re-exported to the tests)

FIGURES: dict = {"examples": 0, "steps": 0, "calls_compared": 0, "ok_calls": 0,
                 "errors_compared": 0,
                 "error_types": collections.Counter(), "bad_inputs": collections.Counter(),
                 "rules": collections.Counter(), "decisions_compared": 0}

# ---------------------------------------------------------------------- observation helpers
_DECISION = re.compile(r"decision=(\w+)")
_OUTCOME = re.compile(r"outcome=(\w+)")


def peek(h) -> tuple[str, str]:
    """(decision, outcome) of a handle *without delivering it*: read from repr(), which both
    implementations render as ``decision=<EXECUTE|CANCEL|None> outcome=<...>``. Reading
    ``h.decision`` would deliver the decision (docs/semantics.md) and change what poll returns
    and what a drop does, so the per-step comparison must not use it."""
    r = repr(h)
    d = _DECISION.search(r)
    o = _OUTCOME.search(r)
    assert d and o, f"repr without decision/outcome: {r}"
    outcome = o.group(1)
    return d.group(1), ("open" if outcome in ("None", "open") else outcome)


def classify(msg: str) -> str:
    """Error messages differ in wording between implementations; compare what they say."""
    m = re.search(r"E#\d+", msg)
    if m:
        return m.group(0)           # an error text this test passed to mark_complete
    if "HandleDroppedError" in msg:
        return "dropped"
    if "timed out" in msg:
        return "timed out"
    return "other"
