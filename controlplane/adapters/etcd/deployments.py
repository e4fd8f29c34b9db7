"""EtcdDeploymentStore: desired state (deployments), placements (intent) and status, in etcd.

Key layout (all JSON, none leased: they must survive every process):

* ``{prefix}/deployments/<name>`` — ``{"spec": ..., "generation": N, "created_at": t}``. The
  key's mod revision is the deployment's ``resource_version``: writers that pass one get a
  compare-and-swap (``Conflict`` if someone wrote in between); ``generation`` goes up by one on
  every spec change (a rewrite of the same spec keeps it).
* ``{prefix}/placements/<name>/<replica-id>`` — where the leader put a replica (node, GPUs,
  template hash). Written *before* the replica is started and deleted *after* it is stopped, so
  a leader that dies in between leaves a record its successor finishes from.
* ``{prefix}/deployment-status/<name>`` — conditions and per-pool counts, written by the leader.
* ``{prefix}/planner/<name>`` — the SLA planner's last view and decisions (JSON), written by the
  leader's planner, read by ``Get`` (``switchboard describe deployment``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from controlplane.adapters.etcd.client import EtcdClient, KeyValue, prefix_range_end
from controlplane.adapters.etcd.listwatch import list_and_watch
from controlplane.core.deployments import ModelDeploymentSpec, PoolRole, keep_planner_replicas
from controlplane.core.reconcile import (
    Condition,
    DeploymentRecord,
    DeploymentStatus,
    PoolStatus,
    ReplicaPlacement,
)
from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass, index_sla_classes
from controlplane.deployspec import spec_from_dict, spec_to_dict
from controlplane.errors import Conflict, InvalidArgument, NotFound

DEFAULT_PREFIX = "/switchboard/v1"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeploymentEvent:
    name: str
    record: DeploymentRecord | None
    """None: deleted (or unreadable)."""


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def encode_placement(p: ReplicaPlacement) -> bytes:
    return _dumps(
        {
            "replica_id": p.replica_id,
            "deployment": p.deployment,
            "role": p.role.value,
            "index": p.index,
            "template": p.template,
            "node_id": p.node_id,
            "ray_node_id": p.ray_node_id,
            "gpu_indices": list(p.gpu_indices),
            "created_at": p.created_at,
            "scores": dict(p.scores),
            "rejections": list(p.rejections),
        }
    )


def decode_placement(raw: bytes) -> ReplicaPlacement:
    try:
        d = json.loads(raw)
        return ReplicaPlacement(
            replica_id=str(d["replica_id"]),
            deployment=str(d["deployment"]),
            role=PoolRole(d["role"]),
            index=int(d["index"]),
            template=str(d["template"]),
            node_id=str(d["node_id"]),
            ray_node_id=str(d.get("ray_node_id", "")),
            gpu_indices=tuple(int(i) for i in d.get("gpu_indices", ())),
            created_at=float(d.get("created_at", 0.0)),
            scores={str(k): float(v) for k, v in d.get("scores", {}).items()},
            rejections=tuple(str(r) for r in d.get("rejections", ())),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"malformed placement record: {e}") from None


def encode_status(s: DeploymentStatus) -> bytes:
    return _dumps(
        {
            "observed_generation": s.observed_generation,
            "conditions": [
                {
                    "type": c.type,
                    "status": c.status,
                    "reason": c.reason,
                    "message": c.message,
                    "last_transition_time": c.last_transition_time,
                }
                for c in s.conditions
            ],
            "pools": [
                {
                    "role": p.role.value,
                    "desired": p.desired,
                    "ready": p.ready,
                    "updated": p.updated,
                    "unschedulable": list(p.unschedulable),
                }
                for p in s.pools
            ],
        }
    )


def decode_status(raw: bytes) -> DeploymentStatus:
    try:
        d = json.loads(raw)
        return DeploymentStatus(
            observed_generation=int(d.get("observed_generation", 0)),
            conditions=tuple(
                Condition(
                    type=str(c["type"]),
                    status=str(c["status"]),
                    reason=str(c.get("reason", "")),
                    message=str(c.get("message", "")),
                    last_transition_time=float(c.get("last_transition_time", 0.0)),
                )
                for c in d.get("conditions", ())
            ),
            pools=tuple(
                PoolStatus(
                    role=PoolRole(p["role"]),
                    desired=int(p["desired"]),
                    ready=int(p["ready"]),
                    updated=int(p.get("updated", 0)),
                    unschedulable=tuple(str(r) for r in p.get("unschedulable", ())),
                )
                for p in d.get("pools", ())
            ),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"malformed deployment status: {e}") from None


class EtcdDeploymentStore:
    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        base = prefix.rstrip("/")
        self.deployments = f"{base}/deployments/"
        self.placements = f"{base}/placements/"
        self.statuses = f"{base}/deployment-status/"
        self.planner = f"{base}/planner/"

    # -- desired state ---------------------------------------------------------------------------

    def _key(self, name: str) -> bytes:
        return (self.deployments + name).encode()

    async def get(self, name: str) -> DeploymentRecord:
        kv = await self.client.get(self._key(name))
        if kv is None:
            raise NotFound(f"deployment {name!r} not found")
        return self._decode(kv.value, kv.mod_revision)

    async def list_all(self) -> list[DeploymentRecord]:
        kvs, _ = await self.client.get_prefix(self.deployments.encode())
        return [self._decode(kv.value, kv.mod_revision) for kv in kvs]

    async def snapshot(self) -> tuple[list[DeploymentRecord], int]:
        """Every readable deployment and the revision the read saw (unreadable ones skipped)."""
        kvs, revision = await self.client.get_prefix(self.deployments.encode())
        return [r for kv in kvs if (r := self._decode_or_none(kv)) is not None], revision

    async def watch(self, start_revision: int) -> AsyncIterator[DeploymentEvent]:
        """Deployment changes from ``start_revision`` until the stream breaks (then it raises)."""
        start = self.deployments.encode()
        async for ev in self.client.watch_range(
            start, prefix_range_end(start), start_revision=start_revision
        ):
            name = ev.kv.key.decode(errors="replace")[len(self.deployments) :]
            record = None if ev.deleted else self._decode_or_none(ev.kv)
            yield DeploymentEvent(name, record)

    def _decode_or_none(self, kv: KeyValue) -> DeploymentRecord | None:
        try:
            return self._decode(kv.value, kv.mod_revision)
        except InvalidArgument as e:
            log.warning("ignoring deployment record %s: %s", kv.key.decode(errors="replace"), e)
            return None

    async def apply(
        self, spec: ModelDeploymentSpec, *, resource_version: int = 0, now: float,
        owner: str = "user",
    ) -> DeploymentRecord:  # fmt: skip
        """Create or replace ``spec`` (CAS on ``resource_version`` when it is not 0).

        ``owner="user"`` (spec edits): autoscaled pools keep their stored ``replicas``
        (``keep_planner_replicas``); ``owner="planner"``: written as given."""
        asked = spec
        for _ in range(5):
            current = await self.client.get(self._key(asked.name))
            old = self._decode(current.value, current.mod_revision) if current else None
            spec = asked if owner == "planner" else keep_planner_replicas(
                asked, old.spec if old else None
            )  # fmt: skip
            if resource_version and (old is None or old.resource_version != resource_version):
                raise Conflict(
                    f"deployment {spec.name!r} changed since resource_version {resource_version} "
                    f"(now {old.resource_version if old else 'deleted'}); get it and retry"
                )
            if old is not None and old.spec == spec:
                return old  # nothing changed: keep generation and revision
            record = DeploymentRecord(
                spec=spec,
                generation=(old.generation + 1) if old else 1,
                created_at=old.created_at if old else now,
            )
            revision = await self.client.put_if_revision(
                self._key(spec.name), self._encode(record), current.mod_revision if current else 0
            )
            if revision:
                return DeploymentRecord(
                    record.spec, record.generation, record.created_at, resource_version=revision
                )
            if resource_version:
                raise Conflict(f"deployment {spec.name!r} changed while writing; get it and retry")
        raise Conflict(f"deployment {spec.name!r} is being changed concurrently; retry")

    async def delete(self, name: str, *, resource_version: int = 0) -> None:
        current = await self.get(name)
        if resource_version and current.resource_version != resource_version:
            raise Conflict(f"deployment {name!r} changed since resource_version {resource_version}")
        if not await self.client.delete_if_revision(self._key(name), current.resource_version):
            raise Conflict(f"deployment {name!r} changed while deleting; retry")

    def _encode(self, record: DeploymentRecord) -> bytes:
        return _dumps(
            {
                "spec": spec_to_dict(record.spec),
                "generation": record.generation,
                "created_at": record.created_at,
            }
        )

    def _decode(self, raw: bytes, revision: int) -> DeploymentRecord:
        try:
            doc = json.loads(raw)
            spec = spec_from_dict(doc["spec"])
            return DeploymentRecord(
                spec=spec,
                generation=int(doc["generation"]),
                created_at=float(doc.get("created_at", 0.0)),
                resource_version=revision,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"malformed deployment record: {e}") from None

    # -- placements ------------------------------------------------------------------------------

    def _pkey(self, p: ReplicaPlacement) -> bytes:
        return f"{self.placements}{p.deployment}/{p.replica_id}".encode()

    async def list_placements(self) -> list[ReplicaPlacement]:
        kvs, _ = await self.client.get_prefix(self.placements.encode())
        return [decode_placement(kv.value) for kv in kvs]

    async def put_placement(self, p: ReplicaPlacement) -> None:
        await self.client.put(self._pkey(p), encode_placement(p))

    async def delete_placement(self, p: ReplicaPlacement) -> None:
        await self.client.delete(self._pkey(p))

    # -- status ----------------------------------------------------------------------------------

    async def get_status(self, name: str) -> DeploymentStatus | None:
        kv = await self.client.get((self.statuses + name).encode())
        return decode_status(kv.value) if kv is not None else None

    async def put_status(self, name: str, status: DeploymentStatus) -> None:
        await self.client.put((self.statuses + name).encode(), encode_status(status))

    async def delete_status(self, name: str) -> None:
        await self.client.delete((self.statuses + name).encode())

    # -- planner ---------------------------------------------------------------------------------

    async def get_planner(self, name: str) -> dict[str, Any] | None:
        kv = await self.client.get((self.planner + name).encode())
        if kv is None:
            return None
        try:
            doc = json.loads(kv.value)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    async def put_planner(self, name: str, doc: Mapping[str, Any]) -> None:
        await self.client.put((self.planner + name).encode(), _dumps(dict(doc)))

    async def delete_planner(self, name: str) -> None:
        await self.client.delete((self.planner + name).encode())


DEFAULT_CLASSES: Mapping[str, SlaClass] = index_sla_classes(DEFAULT_SLA_CLASSES)


class DeploymentCache:
    """Watch-fed deployments, for the gateway: which SLA classes each model offers.

    ``sla_classes(model)`` never touches etcd. A model no deployment names, or whose
    deployments define no classes, gets the defaults. When several deployments serve one model
    the first by name that defines classes wins (a warning names the others). The mapping a
    model gets is the same object until its classes change, so callers can compare with ``is``.
    """

    def __init__(self, store: EtcdDeploymentStore) -> None:
        self._store = store
        self._records: dict[str, DeploymentRecord] = {}
        self._classes: dict[str, Mapping[str, SlaClass]] = {}
        self._listeners: list[Callable[[list[DeploymentRecord]], None]] = []
        self.synced = asyncio.Event()
        self.ever_synced = asyncio.Event()

    def sla_classes(self, model: str) -> Mapping[str, SlaClass]:
        return self._classes.get(model, DEFAULT_CLASSES)

    def deployments(self) -> list[DeploymentRecord]:
        return [self._records[n] for n in sorted(self._records)]

    def subscribe(self, listener: Callable[[list[DeploymentRecord]], None]) -> None:
        """Call ``listener(deployments())`` after every change (and at once if synced)."""
        self._listeners.append(listener)
        if self.ever_synced.is_set():
            listener(self.deployments())

    async def run(self) -> None:
        async def relist() -> int:
            records, revision = await self._store.snapshot()
            self._records = {r.spec.name: r for r in records}
            self._reindex()
            return revision

        async def apply(ev: DeploymentEvent) -> None:
            if ev.record is None:
                self._records.pop(ev.name, None)
            else:
                self._records[ev.name] = ev.record
            self._reindex()

        await list_and_watch(
            "deployment",
            relist,
            self._store.watch,
            apply,
            synced=self.synced,
            ever_synced=self.ever_synced,
        )

    def _reindex(self) -> None:
        chosen: dict[str, tuple[str, tuple[SlaClass, ...]]] = {}
        for name in sorted(self._records):
            spec = self._records[name].spec
            if not spec.sla_classes:
                continue
            if spec.model in chosen:
                if chosen[spec.model][1] != spec.sla_classes:
                    log.warning(
                        "deployments %s and %s both define SLA classes for model %s; using %s's",
                        chosen[spec.model][0], name, spec.model, chosen[spec.model][0],
                    )  # fmt: skip
                continue
            chosen[spec.model] = (name, spec.sla_classes)
        classes: dict[str, Mapping[str, SlaClass]] = {}
        for model, (_, defined) in chosen.items():
            old = self._classes.get(model)
            if old is not None and tuple(old.values()) == defined:
                classes[model] = old  # unchanged: keep the identity
            else:
                classes[model] = MappingProxyType({c.name: c for c in defined})
        self._classes = classes
        if self._listeners:
            records = self.deployments()
            for listener in self._listeners:
                listener(records)
