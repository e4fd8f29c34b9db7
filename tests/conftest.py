"""Fixtures: a real etcd per test (on a free loopback port, data under tmp_path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.local.procs import EtcdServer


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The cpu engine's default random-weight model: made once per machine, then reused."""
    from workers.engines.cpu_model import default_model_dir, ensure_model

    return ensure_model(default_model_dir())


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd-data", log_path=tmp_path / "etcd.log").start()
    try:
        yield server
    finally:
        server.stop()
