"""NVML discovery on a real NVIDIA GPU host. Runs only where NVML finds a driver and a GPU.

On CPU machines (every dev and CI machine) these tests are reported as skipped with the reason;
the declared-inventory path and the NVLink grouping they rely on are covered in tests/unit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from controlplane.nodeagent.inventory import nvml_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not nvml_available(), reason="needs an NVIDIA driver and GPU (NVML)"),
]


def test_nvml_probe_reads_every_gpu() -> None:
    import pynvml

    from controlplane.nodeagent.inventory import NvmlProbe

    probe = NvmlProbe("gpu-host")
    try:
        gpus = probe.read()
        assert len(gpus) == pynvml.nvmlDeviceGetCount() > 0
        assert [g.index for g in gpus] == list(range(len(gpus)))
        for g in gpus:
            assert g.model
            assert g.uuid.startswith("GPU-")
            assert 0 <= g.memory_free_bytes <= g.memory_total_bytes
            assert g.memory_total_bytes > 8 * 1024**3
            assert g.nvlink_domain.startswith("gpu-host/nvl")
        assert len({g.uuid for g in gpus}) == len(gpus)
        # A second read gives the same devices (figures may move).
        again = probe.read()
        assert [g.uuid for g in again] == [g.uuid for g in gpus]
    finally:
        probe.close()


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs nvidia-smi")
def test_gpus_command_agrees_with_nvidia_smi() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "controlplane", "gpus", "--node-id", "gpu-host"],
        check=True,
        capture_output=True,
        text=True,
    )
    doc = json.loads(out.stdout)
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,memory.total", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    rows = [line.split(", ") for line in smi.splitlines()]
    assert [g["uuid"] for g in doc["gpus"]] == [r[0] for r in rows]
    for g, r in zip(doc["gpus"], rows, strict=True):
        assert abs(g["memory_total_bytes"] / 2**20 - float(r[1])) <= 1
