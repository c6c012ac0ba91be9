"""Helpers of the dynamo scenario tests (imported as a plain module: pytest puts tests/scenarios on
sys.path). Only public API."""

from __future__ import annotations

import uuid

import numpy as np

import kvsched
from kvsched import Decision, RequestMode, TransferKind
from figures import STRESS, write_report  # noqa: F401 (re-exported to the tests)

EXECUTE, CANCEL = Decision.EXECUTE, Decision.CANCEL
LOAD, STORE = TransferKind.LOAD, TransferKind.STORE
SCHEDULED, IMMEDIATE = RequestMode.SCHEDULED, RequestMode.IMMEDIATE


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
