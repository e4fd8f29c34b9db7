"""The control plane's view of the fleet for Prometheus: gauges and HTTP service discovery.

``FleetTelemetry.refresh`` (every ``interval_s``, on every replica) lists the workers and the
gateways from etcd and reads the nodes from the watch-fed node cache, then

- sets ``switchboard_workers{model,role,state}``, ``switchboard_nodes{state}`` and
  ``switchboard_gpus{state}`` (``ControlPlaneMetrics``), and
- keeps the target list that ``GET /sd/targets`` on the control plane's metrics port serves in
  Prometheus's ``http_sd_config`` format: a JSON list of ``{"targets": ["host:port"],
  "labels": {...}}`` groups, one per worker / node agent / gateway that published a metrics
  endpoint. Workers placed by Ray listen on ports nobody chose in advance; their etcd records
  carry the port, so Prometheus finds them here.

Target labels: ``component`` (worker | node_agent | gateway) becomes a label of every series
scraped from the target; the rest are ``__meta_switchboard_*`` labels (model, role, worker_id,
node, deployment, pool, gateway_id) for ``relabel_configs`` — they are not kept unless relabelled
(the scraped series carry their own ``worker`` / ``model`` / ``role`` labels already).

Node state, one per node: ``unhealthy`` (its GPUs are), else its scheduling state: ``ready``,
``cordoned``, ``draining``. GPU state: ``healthy`` / ``unhealthy`` by the agent's report, and
``unschedulable`` for healthy GPUs of cordoned / draining nodes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from controlplane.core.model import Node, NodeHealth, SchedulingState, WorkerRecord
from controlplane.telemetry.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)

SD_PATH = "/sd/targets"
SD_CONTENT_TYPE = "application/json"
NODE_STATES = ("ready", "cordoned", "draining", "unhealthy")
GPU_STATES = ("healthy", "unhealthy", "unschedulable")


def node_state(node: Node) -> str:
    if node.inventory.health is NodeHealth.UNHEALTHY:
        return "unhealthy"
    return {
        SchedulingState.SCHEDULABLE: "ready",
        SchedulingState.CORDONED: "cordoned",
        SchedulingState.DRAINING: "draining",
    }[node.scheduling.state]


def sd_target_groups(
    workers: Iterable[WorkerRecord],
    nodes: Iterable[Node],
    gateways: Iterable[tuple[str, str]] = (),
) -> list[dict[str, Any]]:
    """Prometheus ``http_sd_config`` groups (pure): one per worker / node agent with a metrics
    endpoint, and per gateway address (``(gateway_id, http host:port)``; several ids on one
    address are one gateway's processes: one target); sorted, so the answer is stable."""
    groups: list[dict[str, Any]] = []
    for w in sorted(workers, key=lambda w: w.worker_id):
        if not w.metrics_endpoint:
            continue
        groups.append(
            {
                "targets": [w.metrics_endpoint],
                "labels": {
                    "component": "worker",
                    "__meta_switchboard_worker_id": w.worker_id,
                    "__meta_switchboard_model": w.model,
                    "__meta_switchboard_role": w.role,
                    "__meta_switchboard_node": w.node_id,
                    "__meta_switchboard_deployment": w.deployment,
                    "__meta_switchboard_pool": w.pool,
                },
            }
        )
    for n in sorted(nodes, key=lambda n: n.node_id):
        if not n.inventory.metrics_endpoint:
            continue
        groups.append(
            {
                "targets": [n.inventory.metrics_endpoint],
                "labels": {"component": "node_agent", "__meta_switchboard_node": n.node_id},
            }
        )
    seen: set[str] = set()
    for gateway_id, http in sorted(gateways):
        # the processes of one ``gateway --processes N`` share one address, whose /metrics
        # answers their sum: one target, named by the first of their ids
        if http and http not in seen:
            seen.add(http)
            groups.append(
                {
                    "targets": [http],
                    "labels": {"component": "gateway", "__meta_switchboard_gateway_id": gateway_id},
                }
            )
    return groups


class FleetTelemetry:
    def __init__(
        self,
        metrics: ControlPlaneMetrics,
        list_workers: Callable[[], Awaitable[Sequence[WorkerRecord]]],
        list_nodes: Callable[[], Sequence[Node]],
        list_gateways: Callable[[], Awaitable[Sequence[tuple[str, str]]]] | None = None,
        *,
        interval_s: float = 5.0,
    ) -> None:
        self.metrics = metrics
        self._list_workers = list_workers
        self._list_nodes = list_nodes
        self._list_gateways = list_gateways
        self.interval_s = interval_s
        self._body = b"[]"
        self._seen_workers: set[tuple[str, str, str]] = set()

    def sd_targets(self) -> tuple[str, bytes]:
        """The ``/sd/targets`` route: the targets of the last refresh."""
        return SD_CONTENT_TYPE, self._body

    async def refresh(self) -> None:
        workers = list(await self._list_workers())
        nodes = list(self._list_nodes())
        gateways = list(await self._list_gateways()) if self._list_gateways is not None else []
        m = self.metrics
        counts: dict[tuple[str, str, str], int] = {}
        for w in workers:
            key = (w.model, w.role, w.state.value.lower())
            counts[key] = counts.get(key, 0) + 1
        for key in self._seen_workers - set(counts):
            m.workers.labels(*key).set(0)  # a label set that emptied reads 0, not its last value
        for key, n in counts.items():
            m.workers.labels(*key).set(n)
        self._seen_workers |= set(counts)
        node_counts = dict.fromkeys(NODE_STATES, 0)
        gpu_counts = dict.fromkeys(GPU_STATES, 0)
        for node in nodes:
            state = node_state(node)
            node_counts[state] = node_counts.get(state, 0) + 1
            for gpu in node.inventory.gpus:
                if not gpu.healthy:
                    gpu_counts["unhealthy"] += 1
                elif state in ("cordoned", "draining"):
                    gpu_counts["unschedulable"] += 1
                else:
                    gpu_counts["healthy"] += 1
        for state, n in node_counts.items():
            m.nodes.labels(state).set(n)
        for state, n in gpu_counts.items():
            m.gpus.labels(state).set(n)
        self._body = json.dumps(sd_target_groups(workers, nodes, gateways)).encode()

    async def run(self) -> None:
        """Refresh every ``interval_s`` until cancelled (errors are logged, not fatal)."""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("fleet telemetry refresh failed: %s", e)
            await asyncio.sleep(self.interval_s)


def gateway_lister(
    get_prefix: Callable[[bytes], Awaitable[tuple[list[Any], int]]], prefix: str
) -> Callable[[], Awaitable[list[tuple[str, str]]]]:
    """Lists ``(gateway_id, http)`` of the gateway records under ``{prefix}/gateways/``
    (``get_prefix``: ``EtcdClient.get_prefix``)."""
    key = f"{prefix.rstrip('/')}/gateways/".encode()

    async def list_gateways() -> list[tuple[str, str]]:
        kvs, _ = await get_prefix(key)
        out: list[tuple[str, str]] = []
        for kv in kvs:
            try:
                doc = json.loads(kv.value)
                out.append((str(doc["gateway_id"]), str(doc.get("http", ""))))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    return list_gateways
