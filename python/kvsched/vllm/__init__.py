"""kvsched for vLLM: ``KvschedConnector``, a KV connector that offloads KV blocks to a host tier.

Load it with one flag::

    --kv-transfer-config '{"kv_connector": "KvschedConnector",
                           "kv_connector_module_path": "kvsched.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"host_bytes": 4294967296}}'

Tested with vLLM 0.33 and 0.34 (``pip install "kvsched[vllm]"``). ``import kvsched`` never
imports this module; see ``docs/vllm.md``.
"""

from __future__ import annotations

try:
    import vllm  # noqa: F401
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the no-vLLM test
    raise ImportError(
        "kvsched.vllm needs vLLM (tested: 0.33, 0.34); install it with: pip install \"kvsched[vllm]\""
        f" ({exc})"
    ) from exc

from kvsched.vllm.connector import (
    KvschedConnector,
    KvschedConnectorMetadata,
    KvschedConnectorStats,
    KvschedWorkerMetadata,
)

__all__ = ["KvschedConnector", "KvschedConnectorMetadata", "KvschedWorkerMetadata", "KvschedConnectorStats"]
