"""Host-memory KV tier for serving engines: the engine-independent half of kvsched's connectors.

Three pieces, each usable without any serving engine installed:

* :class:`HostTier` (scheduler side): which block hashes the host tier holds, in which host
  slot, with LRU eviction of blocks no transfer is using.
* :class:`OffloadLeader` (scheduler side): per request, the longest prefix of tier hits, the
  loads and stores of each engine step (:class:`StepPlan`), and what to do with the outcomes
  the workers report (:class:`OpReports`).
* :class:`OffloadWorker` (each GPU process): runs a :class:`StepPlan` through a kvsched
  :class:`~kvsched.Scheduler` and :class:`~kvsched.TransferEngine`: every load and store is a
  kvsched operation joined from both halves, a store of layer k is gated on
  ``LayerComplete(k, iteration)``, outcomes come from ``take_finished``.

The same plan carries disaggregated serving's reads between instances (:class:`SendSpec` on
the producer, :class:`RecvSpec` on the consumer; ``docs/disaggregation.md``).

:mod:`kvsched.vllm` adapts them to vLLM's ``KVConnectorBase_V1``; ``docs/vllm.md`` walks a
request through them step by step.
"""

from __future__ import annotations

from kvsched.offload.config import OffloadConfig
from kvsched.offload.leader import OffloadLeader
from kvsched.offload.plan import LoadSpec, OpReports, RecvSpec, SendSpec, StepPlan, StoreSpec
from kvsched.offload.tier import HostTier
from kvsched.offload.worker import OffloadWorker, StepResults

__all__ = [
    "OffloadConfig",
    "HostTier",
    "OffloadLeader",
    "OffloadWorker",
    "StepPlan",
    "LoadSpec",
    "StoreSpec",
    "SendSpec",
    "RecvSpec",
    "OpReports",
    "StepResults",
]
