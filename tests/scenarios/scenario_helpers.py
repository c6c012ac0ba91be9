"""Helpers of the dynamo scenario tests (imported as a plain module: pytest puts tests/scenarios on
sys.path). Only public API."""

from __future__ import annotations

import json
import os
import pathlib
import uuid

import numpy as np

import kvsched
from kvsched import Decision, RequestMode, TransferKind

EXECUTE, CANCEL = Decision.EXECUTE, Decision.CANCEL
LOAD, STORE = TransferKind.LOAD, TransferKind.STORE
SCHEDULED, IMMEDIATE = RequestMode.SCHEDULED, RequestMode.IMMEDIATE
STRESS = os.environ.get("KVSCHED_STRESS", "ci").lower()
REPO = pathlib.Path(__file__).resolve().parents[2]


def new_uuid():
    return uuid.uuid4()


def peek(h):
    """The decision without delivering it (parsed from repr, as both implementations print it)."""
    return repr(h).split("decision=")[1].split()[0]


def counts(w, rid):
    st = w.slot_status(rid)
    return (st.expected, st.completed, st.failed, st.cancelled)


def pools(layers=2, blocks=32, width=64, seed=0):
    """A host source pool with random data and a zeroed destination pool (numpy)."""
    src_arr = np.random.default_rng(seed).standard_normal((layers, blocks, width)).astype(np.float32)
    dst_arr = np.zeros_like(src_arr)
    return src_arr, dst_arr, kvsched.BlockPool.from_array(src_arr), kvsched.BlockPool.from_array(dst_arr)


def write_report(name, figures):
    data = {"stress": STRESS, **figures}
    print(f"\n[kvsched figures] {name}: {json.dumps(data, sort_keys=True, default=str)}")
    target = os.environ.get("KVSCHED_REPORT")
    if target:
        d = REPO / "build" / "test-reports" if target.lower() in ("1", "true", "yes", "on") \
            else pathlib.Path(target)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
