"""Deployments end to end: a real etcd, a real 2-node Ray cluster on loopback with declared GPUs,
node agents bound to the Ray nodes, and a control plane whose leader places sim workers on Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.v1 import deployments_pb2, deployments_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.adapters.grpc.deployments import ROLE_FROM_PB, ROLE_TO_PB, spec_to_pb
from controlplane.core.deployments import PoolRole
from controlplane.core.model import WorkerRecord
from controlplane.deployspec import spec_from_dict
from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import (
    ControlPlaneProc,
    start_agent,
    start_controlplane,
    start_ray_cluster,
    wait_until,
)

GPUS_PER_NODE = 4


@dataclass
class Stack:
    etcd: EtcdServer
    ray: Any  # ray.cluster_utils.Cluster
    ray_nodes: list[Any]
    agents: list[ManagedProcess]
    controlplane: ControlPlaneProc
    tmp: Path

    def stub(self) -> Any:
        channel = grpc.insecure_channel(self.controlplane.address)
        return deployments_pb2_grpc.DeploymentsStub(channel)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("deployments")
    etcd = EtcdServer(tmp / "etcd", log_path=tmp / "etcd.log").start()
    common: dict[str, Any] = {
        "node_ip_address": "127.0.0.1",
        "num_cpus": 1,
        "num_gpus": GPUS_PER_NODE,
        "object_store_memory": 80 * 1024 * 1024,
    }
    try:
        cluster, nodes = start_ray_cluster({**common, "include_dashboard": False}, [common])
    except BaseException:
        etcd.stop()
        raise
    agents: list[ManagedProcess] = []
    cp: ControlPlaneProc | None = None
    try:
        for i, node in enumerate(nodes):
            agents.append(
                start_agent(
                    tmp,
                    etcd.endpoint,
                    f"node-{i}",
                    gpus=GPUS_PER_NODE,
                    labels={"rack": f"rack-{i}"},
                    extra=["--ray-node-id", node.node_id, "--nvlink-domain-size", "4"],
                )
            )
        cp = start_controlplane(
            tmp,
            etcd.endpoint,
            "cp-1",
            extra=["--ray-address", cluster.address, "--worker-ttl", "3"],
        )
        yield Stack(etcd, cluster, nodes, agents, cp, tmp)
    finally:
        if cp is not None:
            cp.process.stop()
        for agent in agents:
            agent.stop()
        cluster.shutdown()
        etcd.stop()


def list_workers(endpoint: str) -> dict[str, WorkerRecord]:
    async def read() -> list[WorkerRecord]:
        client = EtcdClient(endpoint)
        try:
            return await EtcdWorkerRegistry(client).list_workers()
        finally:
            await client.close()

    return {w.worker_id: w for w in asyncio.run(read())}


def spec(name: str, prefill: int, decode: int, tp: int = 2) -> deployments_pb2.ModelDeploymentSpec:
    return spec_to_pb(
        spec_from_dict(
            {
                "name": name,
                "model": f"{name}-model",
                "engine": "sim",
                "parallelism": {"tensor": tp},
                "engine_args": {"profile": "tiny-test", "speedup": "10"},
                "pools": [
                    {"role": "prefill", "replicas": prefill, "max_replicas": 8, "min_replicas": 0},
                    {"role": "decode", "replicas": decode, "max_replicas": 8, "min_replicas": 0},
                ],
            }
        )
    )


def condition(d: Any, type_: str) -> Any:
    return next((c for c in d.status.conditions if c.type == type_), None)


def test_deploy_scale_beyond_capacity_and_delete(stack: Stack) -> None:
    stub = stack.stub()
    stub.Apply(deployments_pb2.ApplyDeploymentRequest(spec=spec("llm", 2, 2)), timeout=10)

    def available() -> Any:
        d = stub.Get(deployments_pb2.GetDeploymentRequest(name="llm"), timeout=10)
        ok = condition(d, "Available")
        pools = {ROLE_FROM_PB[p.role]: (p.ready, p.desired) for p in d.status.pools}
        full = pools.get(PoolRole.PREFILL) == (2, 2) and pools.get(PoolRole.DECODE) == (2, 2)
        return d if ok is not None and ok.status == "True" and full else None

    d = wait_until(available, 90, interval_s=0.5, what="2 prefill + 2 decode ready")
    assert condition(d, "Degraded").status == "False"
    workers = list_workers(stack.etcd.endpoint)
    assert len(workers) == 4
    assert {w.role for w in workers.values()} == {"prefill", "decode"}

    explained = stub.Explain(deployments_pb2.ExplainDeploymentRequest(name="llm"), timeout=10)
    placed = [(ROLE_FROM_PB[p.role], p.node_id) for p in explained.placements]
    assert len(placed) == 4
    for role in (PoolRole.PREFILL, PoolRole.DECODE):
        # replicas of a pool spread over both nodes (failure domains)
        assert sorted(n for r, n in placed if r is role) == ["node-0", "node-1"]
    for w in workers.values():  # each worker runs on the node its placement names
        assert w.node_id in ("node-0", "node-1")

    # beyond capacity: 8 GPUs are all taken by 4 tp-2 replicas
    stub.Scale(
        deployments_pb2.ScaleDeploymentRequest(
            name="llm", role=ROLE_TO_PB[PoolRole.DECODE], replicas=3
        ),
        timeout=10,
    )

    def unschedulable() -> Any:
        d = stub.Get(deployments_pb2.GetDeploymentRequest(name="llm"), timeout=10)
        c = condition(d, "Progressing")
        return d if c is not None and c.reason == "Unschedulable" else None

    d = wait_until(unschedulable, 30, interval_s=0.5, what="Unschedulable")
    decode = next(p for p in d.status.pools if ROLE_FROM_PB[p.role] is PoolRole.DECODE)
    assert decode.desired == 3
    assert decode.ready == 2
    assert any("node-0" in r for r in decode.unschedulable)
    assert any("node-1" in r for r in decode.unschedulable)
    assert condition(d, "Degraded").status == "True"
    # nothing half-started: still exactly four workers, and no pending placement group
    assert len(list_workers(stack.etcd.endpoint)) == 4

    # bad specs are refused with the field named
    bad = spec("bad", 1, 1)
    bad.pools[0].min_replicas = 3
    bad.pools[0].max_replicas = 2
    with pytest.raises(grpc.RpcError) as info:
        stub.Apply(deployments_pb2.ApplyDeploymentRequest(spec=bad), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_replicas" in (info.value.details() or "")

    stub.Delete(deployments_pb2.DeleteDeploymentRequest(name="llm"), timeout=10)
    wait_until(lambda: not list_workers(stack.etcd.endpoint), 60, what="workers drained and gone")
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(deployments_pb2.GetDeploymentRequest(name="llm"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def aggregated(name: str, replicas: int, **engine_args: str) -> deployments_pb2.ModelDeploymentSpec:
    return spec_to_pb(
        spec_from_dict(
            {
                "name": name,
                "model": f"{name}-model",
                "engine": "sim",
                "engine_args": {"profile": "tiny-test", "speedup": "10", **engine_args},
                "pools": [
                    {"role": "aggregated", "replicas": replicas, "min_replicas": 0,
                     "max_replicas": 8},
                ],
            }
        )
    )  # fmt: skip


def ready(stub: Any, name: str, want: int) -> Any:
    d = stub.Get(deployments_pb2.GetDeploymentRequest(name=name), timeout=10)
    pools = [(p.ready, p.desired, p.updated) for p in d.status.pools]
    return d if pools == [(want, want, want)] else None


def workers_of(endpoint: str, model: str) -> dict[str, WorkerRecord]:
    return {k: w for k, w in list_workers(endpoint).items() if w.model == model}


def ray_groups(stack: Stack) -> list[str]:
    """Switchboard placement groups Ray holds (not removed), read from the GCS by a helper."""
    import subprocess
    import sys

    code = (
        f"import ray, json; ray.init(address={stack.ray.address!r}, namespace='switchboard', "
        "logging_level='ERROR');"
        "from ray.util import placement_group_table as t;"
        "print(json.dumps(sorted(v['name'] for v in t().values() "
        "if v['name'].startswith('sb-pg-') and v['state'] != 'REMOVED')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    import json

    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cordon_keeps_new_replicas_off_and_drain_moves_them_after_inflight_work(
    stack: Stack,
) -> None:
    from switchboard.v1 import inference_pb2, nodes_pb2, nodes_pb2_grpc, worker_pb2, worker_pb2_grpc

    stub = stack.stub()
    nodes = nodes_pb2_grpc.NodeRegistryStub(grpc.insecure_channel(stack.controlplane.address))
    # slow enough that a request is still streaming when its node is drained
    stub.Apply(
        deployments_pb2.ApplyDeploymentRequest(spec=aggregated("cd", 2, speedup="0.5")), timeout=10
    )
    wait_until(lambda: ready(stub, "cd", 2), 90, interval_s=0.5, what="2 replicas ready")
    on = {w.node_id: w for w in workers_of(stack.etcd.endpoint, "cd-model").values()}
    assert sorted(on) == ["node-0", "node-1"]  # spread

    nodes.CordonNode(nodes_pb2.CordonNodeRequest(node_id="node-1", reason="test"), timeout=10)
    stub.Scale(
        deployments_pb2.ScaleDeploymentRequest(
            name="cd", role=ROLE_TO_PB[PoolRole.AGGREGATED], replicas=3
        ),
        timeout=10,
    )
    wait_until(lambda: ready(stub, "cd", 3), 90, interval_s=0.5, what="3 replicas ready")
    placed = [w.node_id for w in workers_of(stack.etcd.endpoint, "cd-model").values()]
    assert sorted(placed) == ["node-0", "node-0", "node-1"]  # the new one avoided node-1

    # a long request on node-1's worker, then drain node-1
    victim = on["node-1"]
    call = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(victim.endpoint)).Decode(
        worker_pb2.DecodeRequest(
            request_id="long",
            prompt_token_ids=list(range(1, 40)),
            sampling=inference_pb2.SamplingParams(max_tokens=600),
        ),
        timeout=120,
    )
    first = next(call)
    nodes.DrainNode(nodes_pb2.DrainNodeRequest(node_id="node-1", reason="test"), timeout=10)
    tokens = len(first.token_ids) + sum(len(c.token_ids) for c in call)
    assert tokens == 600  # the in-flight request finished on the draining worker

    def moved() -> bool:
        found = workers_of(stack.etcd.endpoint, "cd-model")
        return len(found) == 3 and all(w.node_id == "node-0" for w in found.values())

    wait_until(moved, 90, interval_s=0.5, what="replicas moved off node-1")
    wait_until(lambda: ready(stub, "cd", 3), 60, interval_s=0.5, what="3 ready after drain")
    nodes.UncordonNode(nodes_pb2.UncordonNodeRequest(node_id="node-1"), timeout=10)
    stub.Delete(deployments_pb2.DeleteDeploymentRequest(name="cd"), timeout=10)
    wait_until(lambda: not workers_of(stack.etcd.endpoint, "cd-model"), 60, what="cd gone")


def test_leader_killed_mid_rollout_converges_without_duplicates(stack: Stack) -> None:
    standby = start_controlplane(
        stack.tmp,
        stack.etcd.endpoint,
        "cp-2",
        extra=["--ray-address", stack.ray.address, "--worker-ttl", "3"],
    )
    stub = stack.stub()
    stub.Apply(deployments_pb2.ApplyDeploymentRequest(spec=aggregated("roll", 2)), timeout=10)
    wait_until(lambda: ready(stub, "roll", 2), 90, interval_s=0.5, what="roll ready")
    old = set(workers_of(stack.etcd.endpoint, "roll-model"))

    # a spec change starts a rolling update; the leader dies as soon as it has begun
    stub.Apply(
        deployments_pb2.ApplyDeploymentRequest(spec=aggregated("roll", 2, seed_note="v2")),
        timeout=10,
    )
    wait_until(
        lambda: set(workers_of(stack.etcd.endpoint, "roll-model")) - old,
        60,
        interval_s=0.2,
        what="the first new replica",
    )
    stack.controlplane.process.kill()
    stack.controlplane = standby
    stub = stack.stub()

    def converged() -> bool:
        found = workers_of(stack.etcd.endpoint, "roll-model")
        return len(found) == 2 and not (set(found) & old) and bool(ready(stub, "roll", 2))

    wait_until(converged, 120, interval_s=0.5, what="the new leader to finish the rollout")
    groups = [g for g in ray_groups(stack) if g.startswith("sb-pg-roll-")]
    assert len(groups) == 2, groups  # no duplicate or leftover replicas
    stub.Delete(deployments_pb2.DeleteDeploymentRequest(name="roll"), timeout=10)
    wait_until(lambda: not workers_of(stack.etcd.endpoint, "roll-model"), 60, what="roll gone")


def test_cli_apply_get_describe_explain_scale_delete(stack: Stack) -> None:
    import subprocess
    import sys

    def sb(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "controlplane", *args, "--endpoint", stack.controlplane.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    spec_file = stack.tmp / "cli.yaml"
    spec_file.write_text(
        "name: cli\n"
        "model: cli-model\n"
        "engine: sim\n"
        "engine_args: {profile: tiny-test, speedup: 10}\n"
        "pools:\n"
        "  - {role: aggregated, replicas: 1, min_replicas: 0, max_replicas: 3}\n"
    )
    assert "deployment/cli applied (generation 1)" in sb("apply", "-f", str(spec_file))
    stub = stack.stub()
    wait_until(lambda: ready(stub, "cli", 1), 90, interval_s=0.5, what="cli ready")
    table = sb("get", "deployments")
    assert "cli-model" in table
    assert "aggregated 1/1" in table
    described = sb("describe", "deployment", "cli")
    assert "Available" in described
    assert "MinimumReplicasAvailable" in described
    explained = sb("explain", "deployment", "cli")
    assert "aggregated/0: on node-" in explained
    assert "scaled to 2" in sb(
        "scale", "deployment", "cli", "--role", "aggregated", "--replicas", "2"
    )
    wait_until(lambda: ready(stub, "cli", 2), 90, interval_s=0.5, what="cli scaled")

    # a typo in the file is named; nothing is written
    spec_file.write_text(spec_file.read_text().replace("replicas: 1,", "replcas: 1,"))
    bad = subprocess.run(
        [sys.executable, "-m", "controlplane", "apply", "-f", str(spec_file),
         "--endpoint", stack.controlplane.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "replcas" in bad.stderr
    assert "deployment/cli deleted" in sb("delete", "deployment", "cli")
    wait_until(lambda: not workers_of(stack.etcd.endpoint, "cli-model"), 60, what="cli gone")


def test_lost_node_degrades_then_replicas_are_replaced(stack: Stack) -> None:
    stub = stack.stub()
    stub.Apply(deployments_pb2.ApplyDeploymentRequest(spec=aggregated("lost", 2)), timeout=10)
    wait_until(lambda: ready(stub, "lost", 2), 90, interval_s=0.5, what="lost ready")
    assert sorted(w.node_id for w in workers_of(stack.etcd.endpoint, "lost-model").values()) == [
        "node-0",
        "node-1",
    ]
    # the host dies: its Ray node and its node agent go together
    stack.ray.remove_node(stack.ray_nodes[1], allow_graceful=False)
    stack.agents[1].kill()

    def degraded() -> Any:
        d = stub.Get(deployments_pb2.GetDeploymentRequest(name="lost"), timeout=10)
        c = condition(d, "Degraded")
        return c if c is not None and c.status == "True" else None

    c = wait_until(degraded, 60, interval_s=0.3, what="Degraded")
    assert c.reason in ("ReplicaLost", "ReplicasNotReady")
    wait_until(lambda: ready(stub, "lost", 2), 120, interval_s=0.5, what="restored on node-0")
    # the dead worker's record goes when its lease expires (TTL 3 s): then only node-0 remains

    def placed() -> list[str]:
        return sorted(w.node_id for w in workers_of(stack.etcd.endpoint, "lost-model").values())

    wait_until(lambda: placed() == ["node-0", "node-0"], 15, interval_s=0.5, what="old lease gone")
