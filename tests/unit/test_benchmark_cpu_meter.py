"""The gateway benchmark's CPU accounting (benchmarks/gateway_overhead.py): a process tree's CPU
time from /proc, and the meter that splits a run's CPU per request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.gateway_overhead import CpuMeter, tree_cpu_s

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BURN = """\
import sys, time
sys.stdin.readline()
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("done", flush=True)
sys.stdin.read()
"""
"""A child that, once it reads a line, spends 0.3 s of CPU, says so, and waits for its stdin
to close."""


def burner() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


def burn(child: subprocess.Popen[bytes]) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(b"go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == b"done"


def test_tree_cpu_counts_live_descendants() -> None:
    child = burner()
    try:
        burn(child)
        own = tree_cpu_s(child.pid)
        assert own >= 0.25  # its 0.3 s of CPU, at clock-tick resolution
        # the child is part of this process's tree: the tree spent at least its CPU
        assert tree_cpu_s(os.getpid()) >= own
    finally:
        child.kill()
        child.wait()


def test_tree_cpu_of_a_process_that_is_gone_is_zero() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert tree_cpu_s(child.pid) == 0.0


def test_meter_splits_cpu_per_request() -> None:
    child = burner()
    try:
        meter = CpuMeter(front=None, backends=[child.pid])
        meter.begin()  # before the child burns its CPU
        burn(child)
        split = meter.per_request_us(100)
    finally:
        child.kill()
        child.wait()
    assert split["front_door"] == 0.0  # no front door (direct)
    assert split["backends"] >= 0.25 * 1e6 / 100  # its 0.3 s over 100 requests
    assert split["wrk"] >= 0.0
