"""JSON encoding of the records Switchboard keeps in etcd.

JSON (not protobuf) so that ``etcdctl get --prefix /switchboard/v1/`` is readable by an SRE.
Every record carries ``"v": 1``; readers ignore fields they do not know.
"""

from __future__ import annotations

import json
from typing import Any

from controlplane.core.model import Gpu, NodeInventory, NodeSchedulingStatus, SchedulingState
from controlplane.errors import InvalidArgument

RECORD_VERSION = 1


def gpu_to_dict(g: Gpu) -> dict[str, Any]:
    return {
        "index": g.index,
        "uuid": g.uuid,
        "model": g.model,
        "memory_total_bytes": g.memory_total_bytes,
        "memory_free_bytes": g.memory_free_bytes,
        "nvlink_domain": g.nvlink_domain,
        "healthy": g.healthy,
    }


def encode_inventory(inv: NodeInventory) -> bytes:
    doc: dict[str, Any] = {
        "v": RECORD_VERSION,
        "node_id": inv.node_id,
        "hostname": inv.hostname,
        "address": inv.address,
        "ray_node_id": inv.ray_node_id,
        "agent_version": inv.agent_version,
        "labels": dict(inv.labels),
        "health_message": inv.health_message,
        "registered_at": inv.registered_at,
        "last_heartbeat": inv.last_heartbeat,
        "gpus": [gpu_to_dict(g) for g in inv.gpus],
        "metrics_endpoint": inv.metrics_endpoint,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_inventory(raw: bytes) -> NodeInventory:
    try:
        doc = json.loads(raw)
        return NodeInventory(
            node_id=str(doc["node_id"]),
            hostname=str(doc.get("hostname", "")),
            address=str(doc.get("address", "")),
            ray_node_id=str(doc.get("ray_node_id", "")),
            agent_version=str(doc.get("agent_version", "")),
            labels={str(k): str(v) for k, v in doc.get("labels", {}).items()},
            health_message=str(doc.get("health_message", "")),
            registered_at=float(doc.get("registered_at", 0.0)),
            last_heartbeat=float(doc.get("last_heartbeat", 0.0)),
            metrics_endpoint=str(doc.get("metrics_endpoint", "")),
            gpus=tuple(
                Gpu(
                    index=int(g["index"]),
                    uuid=str(g.get("uuid", "")),
                    model=str(g.get("model", "")),
                    memory_total_bytes=int(g.get("memory_total_bytes", 0)),
                    memory_free_bytes=int(g.get("memory_free_bytes", 0)),
                    nvlink_domain=str(g.get("nvlink_domain", "")),
                    healthy=bool(g.get("healthy", True)),
                )
                for g in doc.get("gpus", [])
            ),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidArgument(f"malformed node record: {e}") from None


def encode_scheduling(status: NodeSchedulingStatus) -> bytes:
    doc = {
        "v": RECORD_VERSION,
        "state": status.state.value,
        "reason": status.reason,
        "since": status.since,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_scheduling(raw: bytes) -> NodeSchedulingStatus:
    try:
        doc = json.loads(raw)
        return NodeSchedulingStatus(
            state=SchedulingState(doc["state"]),
            reason=str(doc.get("reason", "")),
            since=float(doc.get("since", 0.0)),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"malformed node scheduling record: {e}") from None
