"""The checked-in generated API must equal a fresh generation from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "proto" / "switchboard" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "protogen.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh_dir = tmp_path / "switchboard" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if "_pb2" in p.name}
    checked_in = {p.name: p.read_bytes() for p in API.iterdir() if "_pb2" in p.name}
    assert sorted(fresh) == sorted(checked_in), "generated file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated code {stale}: run `make proto` and commit"
    protos = sorted(p.stem for p in API.glob("*.proto"))
    assert protos == ["control_plane", "deployments", "inference", "nodes", "worker"]


def test_v1_services_are_defined() -> None:
    from switchboard.v1 import (
        control_plane_pb2,
        deployments_pb2,
        inference_pb2,
        nodes_pb2,
        worker_pb2,
    )

    def methods(mod: object, service: str) -> set[str]:
        desc = mod.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
        return {m.name for m in desc.methods}

    assert methods(nodes_pb2, "NodeRegistry") == {
        "RegisterNode", "Heartbeat", "ListNodes", "WatchNodes",
        "CordonNode", "UncordonNode", "DrainNode",
    }  # fmt: skip
    assert methods(deployments_pb2, "Deployments") == {
        "Apply", "Get", "List", "Delete", "Scale", "Explain",
    }  # fmt: skip
    assert methods(inference_pb2, "Inference") == {"Generate", "ListModels"}
    assert methods(worker_pb2, "Worker") == {
        "Prefill", "Decode", "DecodeUnary", "FetchKv", "Abort", "Stats", "WatchStats",
    }  # fmt: skip
    assert methods(control_plane_pb2, "ControlPlane") == {"GetStatus"}
    gen = nodes_pb2.DESCRIPTOR.services_by_name["NodeRegistry"].methods_by_name["WatchNodes"]
    assert gen.server_streaming
