"""RayReplicaRuntime: the only code that talks to Ray. Runs worker replicas as Ray actors.

Theory of operation
-------------------
A *replica* is one worker of a deployment's pool (``ReplicaLaunch``: a stable ``replica_id``,
the node it was placed on, how many GPUs, and the worker's settings). Starting one is two Ray
objects, both **named** after the replica and **detached** (they outlive the control plane that
made them, so a leader change or restart finds them again instead of starting duplicates):

* a placement group ``sb-pg-<replica_id>`` of ``gpus`` bundles ``{"GPU": 1}``, STRICT_PACK, each
  bundle label-selected onto the chosen node (``ray.io/node-id``): the TP ranks share one node
  (a GPU-less replica, the cpu engine's, gets one small CPU bundle, only to pin it);
* an actor ``sb-<replica_id>`` (``WorkerReplica``) in bundle 0, which runs the worker
  (``workers.main.run_worker``: the Worker gRPC service, etcd registration, load reports) on its
  own event loop. Engines that launch their own TP ranks (vLLM's Ray executor) use the other
  bundles of the group.

Every operation is idempotent by name: ``start`` of a replica whose actor exists is a no-op;
``stop`` of one that is gone is a no-op. ``stop`` drains first (the worker stops taking work,
finishes in-flight requests, deregisters), then kills the actor and removes the group.
``observe`` lists what Ray holds (``sb-pg-*`` groups with their state and node, live ``sb-*``
actors), which the reconciler compares with the placements it recorded.

Ray's Python API blocks; every call here runs in a worker thread (``asyncio.to_thread``), and
Ray exceptions are translated into ``Unavailable`` at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.errors import Unavailable

log = logging.getLogger(__name__)

PG_PREFIX = "sb-pg-"
ACTOR_PREFIX = "sb-"
RAY_NODE_ID_LABEL = "ray.io/node-id"
CPU_ONLY_SHARE = 0.01
"""CPU a GPU-less replica's bundle reserves: Ray needs a non-empty bundle to place it."""


@dataclass(frozen=True)
class ReplicaLaunch:
    """What the runtime needs to start one replica."""

    replica_id: str
    ray_node_id: str
    gpus: int
    worker: dict[str, Any]
    """``workers.main.WorkerSettings`` fields (JSON-able) for the replica's worker."""


@dataclass(frozen=True)
class ReplicaObservation:
    """One replica as Ray sees it."""

    replica_id: str
    group_state: str = ""  # PENDING | CREATED | RESCHEDULING | REMOVED | "" (no group)
    group_node_ids: tuple[str, ...] = ()
    actor_alive: bool = False


@dataclass
class RayReplicaRuntime:
    """Runs replicas on a Ray cluster. ``address``: the GCS address (``host:port``)."""

    address: str
    namespace: str = "switchboard"
    drain_timeout_s: float = 30.0
    _connected: bool = field(default=False, init=False)

    async def connect(self) -> None:
        await self._call(self._connect)

    def _connect(self) -> None:
        if self._connected:
            return
        import ray

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                namespace=self.namespace,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        self._connected = True

    async def start(self, launch: ReplicaLaunch) -> None:
        await self._call(self._start, launch)

    async def stop(self, replica_id: str, *, drain: bool = True) -> None:
        await self._call(self._stop, replica_id, drain)

    async def observe(self) -> dict[str, ReplicaObservation]:
        result: dict[str, ReplicaObservation] = await self._call(self._observe)
        return result

    async def ray_nodes(self) -> dict[str, bool]:
        """Ray node id -> alive."""
        result: dict[str, bool] = await self._call(self._ray_nodes)
        return result

    def close(self) -> None:
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False

    # -- blocking Ray calls (worker threads) ------------------------------------------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(self._with_connection, fn, *args)
        except Unavailable:
            raise
        except Exception as e:  # Ray raises many types; all mean "Ray did not do it"
            raise Unavailable(f"ray: {type(e).__name__}: {e}") from e

    def _with_connection(self, fn: Any, *args: Any) -> Any:
        self._connect()
        return fn(*args)

    def _start(self, launch: ReplicaLaunch) -> None:
        import ray
        from ray.util.placement_group import get_placement_group, placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from controlplane.adapters.ray.replica import WorkerReplica

        actor_name = ACTOR_PREFIX + launch.replica_id
        try:
            ray.get_actor(actor_name)
            return  # already running (or starting): nothing to do
        except ValueError:
            pass
        pg_name = PG_PREFIX + launch.replica_id
        try:
            group = get_placement_group(pg_name)
        except ValueError:
            # a GPU-less replica (cpu engine) still gets a group, to pin it to its node
            bundles = [{"GPU": 1.0}] * launch.gpus if launch.gpus else [{"CPU": CPU_ONLY_SHARE}]
            group = placement_group(
                bundles,
                strategy="STRICT_PACK",
                name=pg_name,
                lifetime="detached",
                bundle_label_selector=[{RAY_NODE_ID_LABEL: launch.ray_node_id}] * len(bundles),
            )
        actor_cls: Any = ray.remote(WorkerReplica)
        actor = actor_cls.options(
            name=actor_name,
            lifetime="detached",
            num_cpus=0,
            num_gpus=1 if launch.gpus > 0 else 0,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0
            ),
        ).remote()
        actor.start.remote(json.dumps(launch.worker))
        log.info("started replica %s on ray node %s", launch.replica_id, launch.ray_node_id[:12])

    def _stop(self, replica_id: str, drain: bool) -> None:
        import ray
        from ray.util.placement_group import get_placement_group, remove_placement_group

        try:
            actor = ray.get_actor(ACTOR_PREFIX + replica_id)
        except ValueError:
            actor = None
        if actor is not None:
            if drain:
                try:
                    ray.get(
                        actor.drain.remote(self.drain_timeout_s), timeout=self.drain_timeout_s + 5
                    )
                except Exception as e:  # dead or unreachable: kill it anyway
                    log.info("replica %s did not drain cleanly: %s", replica_id, e)
            ray.kill(actor, no_restart=True)
        with contextlib.suppress(ValueError):
            remove_placement_group(get_placement_group(PG_PREFIX + replica_id))
        log.info("stopped replica %s", replica_id)

    def _observe(self) -> dict[str, ReplicaObservation]:
        import ray
        from ray.util import placement_group_table

        seen: dict[str, dict[str, Any]] = {}
        for entry in placement_group_table().values():
            name = str(entry.get("name") or "")
            state = str(entry.get("state") or "")
            if not name.startswith(PG_PREFIX) or state == "REMOVED":
                continue
            nodes = tuple(
                sorted({str(n) for n in (entry.get("bundles_to_node_id") or {}).values()})
            )
            seen[name[len(PG_PREFIX) :]] = {"group_state": state, "group_node_ids": nodes}
        for name in ray.util.list_named_actors():
            if (
                isinstance(name, str)
                and name.startswith(ACTOR_PREFIX)
                and not name.startswith(PG_PREFIX)
            ):
                seen.setdefault(name[len(ACTOR_PREFIX) :], {})["actor_alive"] = True
        return {rid: ReplicaObservation(replica_id=rid, **fields) for rid, fields in seen.items()}

    def _ray_nodes(self) -> dict[str, bool]:
        import ray

        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        return {str(n["NodeID"]): bool(n["Alive"]) for n in nodes}


def launch_to_json(launch: ReplicaLaunch) -> str:
    return json.dumps(asdict(launch), sort_keys=True)
