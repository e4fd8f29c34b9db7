"""EtcdWorkerRegistry: lease-bound worker records.

Key layout: ``{prefix}/workers/<model>/<role>/<worker-id>`` -> JSON ``WorkerRecord`` (with its
deployment, pool kind, the deployment's long-context threshold and whether the engine prefills
in chunks, which the gateway's router reads), bound to the worker's lease (it disappears within
one TTL of the worker dying). Routers and the reconciler list + watch ``{prefix}/workers/`` the
way the control plane watches nodes.
"""

from __future__ import annotations

import json

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.core.model import WorkerRecord, WorkerState
from controlplane.errors import InvalidArgument

DEFAULT_PREFIX = "/switchboard/v1"


def encode_worker(rec: WorkerRecord) -> bytes:
    doc = {
        "v": 1,
        "worker_id": rec.worker_id,
        "model": rec.model,
        "role": rec.role,
        "engine": rec.engine,
        "endpoint": rec.endpoint,
        "node_id": rec.node_id,
        "max_context_tokens": rec.max_context_tokens,
        "kv_blocks_total": rec.kv_blocks_total,
        "state": rec.state.value,
        "started_at": rec.started_at,
        "deployment": rec.deployment,
        "pool": rec.pool,
        "long_context_threshold_tokens": rec.long_context_threshold_tokens,
        "chunked_prefill": rec.chunked_prefill,
        "metrics_endpoint": rec.metrics_endpoint,
        "token_endpoint": rec.token_endpoint,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_worker(raw: bytes) -> WorkerRecord:
    try:
        doc = json.loads(raw)
        return WorkerRecord(
            worker_id=str(doc["worker_id"]),
            model=str(doc["model"]),
            role=str(doc["role"]),
            engine=str(doc["engine"]),
            endpoint=str(doc["endpoint"]),
            node_id=str(doc.get("node_id", "")),
            max_context_tokens=int(doc.get("max_context_tokens", 0)),
            kv_blocks_total=int(doc.get("kv_blocks_total", 0)),
            state=WorkerState(doc.get("state", WorkerState.SERVING.value)),
            started_at=float(doc.get("started_at", 0.0)),
            deployment=str(doc.get("deployment", "")),
            pool=str(doc.get("pool", "")),
            long_context_threshold_tokens=int(doc.get("long_context_threshold_tokens", 0)),
            chunked_prefill=bool(doc.get("chunked_prefill", False)),
            metrics_endpoint=str(doc.get("metrics_endpoint", "")),
            token_endpoint=str(doc.get("token_endpoint", "")),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"malformed worker record: {e}") from None


class EtcdWorkerRegistry:
    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = f"{prefix.rstrip('/')}/workers/"

    def key(self, rec: WorkerRecord) -> bytes:
        return f"{self.prefix}{rec.model}/{rec.role}/{rec.worker_id}".encode()

    async def register(self, record: WorkerRecord, ttl_s: int) -> int:
        return await self.client.put_with_new_lease(self.key(record), encode_worker(record), ttl_s)

    async def update(self, record: WorkerRecord, lease_id: int) -> int:
        return await self.client.put(self.key(record), encode_worker(record), lease=lease_id)

    async def keepalive(self, lease_id: int) -> int:
        return await self.client.keepalive_once(lease_id)

    async def deregister(self, lease_id: int) -> None:
        await self.client.revoke_lease(lease_id)

    async def list_workers(self) -> list[WorkerRecord]:
        kvs, _ = await self.client.get_prefix(self.prefix.encode())
        return [decode_worker(kv.value) for kv in kvs]
