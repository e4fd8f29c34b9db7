"""The README's two commands, run as a new user would: `make up`, then Ctrl-C (and `make up`
again on the same state).

(`make test` is what runs this file, so the other command is exercised by running at all.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.core.model import WorkerRecord
from controlplane.errors import SwitchboardError
from controlplane.local.procs import free_port, pid_alive
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def _post(request: urllib.request.Request) -> dict[str, Any] | None:
    """The JSON answer, or None while the gateway is not ready (not listening yet, 503 / no
    route yet)."""
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result
    except urllib.error.HTTPError as e:
        if e.code == 503:
            return None
        raise
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            return None
        raise


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(unreadable: {e})"


def list_workers(endpoint: str) -> dict[str, WorkerRecord]:
    async def read() -> list[WorkerRecord]:
        client = EtcdClient(endpoint)
        try:
            return await EtcdWorkerRegistry(client).list_workers()
        finally:
            await client.close()

    return {w.worker_id: w for w in asyncio.run(read())}


def test_make_up_lists_two_nodes_of_four_gpus_and_stops_cleanly(tmp_path: Path) -> None:
    etcd_port, grpc_port, gateway_port = free_port(), free_port(), free_port()
    state = tmp_path / "state"
    up_args = (
        f"--etcd-port {etcd_port} --grpc-port {grpc_port} --gateway-port {gateway_port} "
        f"--state-dir {state}"
    )
    log_path = tmp_path / "make-up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["make", "up", f"UP_ARGS={up_args}"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )
    pids: dict[str, int] = {}
    try:
        switchboard = str(Path(sys.executable).parent / "switchboard")

        def listed() -> str:
            if proc.poll() is not None:
                raise AssertionError(f"make up exited early:\n{log_path.read_text()[-3000:]}")
            out = subprocess.run(
                [switchboard, "nodes", "--endpoint", f"127.0.0.1:{grpc_port}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            rows = [line.split() for line in out.stdout.splitlines()[1:]]
            ok = len(rows) == 2 and all(r[1] == "Ready" and r[2] == "4" for r in rows)
            return out.stdout if ok else ""

        table = wait_until(listed, 180, interval_s=1.0, what="`switchboard nodes` to list 2x4")
        assert "local-0" in table
        assert "local-1" in table
        wait_until(lambda: "Switchboard is up." in log_path.read_text(), 30, what="banner")
        pids = {k: int(v) for k, v in json.loads((state / "up.pids").read_text()).items()}
        assert {"etcd", "controlplane", "agent-local-0", "agent-local-1"} <= set(pids)
        assert any(k.startswith("ray-") for k in pids)
        assert all(pid_alive(p) for p in pids.values())

        # the default deployment's two cpu workers, placed on Ray by the control plane, serve a
        # real request: prefill -> KV hand-off -> decode
        def both_workers() -> dict[str, WorkerRecord]:
            found = list_workers(f"127.0.0.1:{etcd_port}")
            return found if len(found) == 2 else {}

        workers = wait_until(both_workers, 120, what="both workers registered")
        assert {w.engine for w in workers.values()} == {"cpu"}
        by_role = {w.role: w for w in workers.values()}
        prompt = list(range(10, 90))
        params = inference_pb2.SamplingParams(max_tokens=8)
        with (
            grpc.insecure_channel(by_role["prefill"].endpoint) as pc,
            grpc.insecure_channel(by_role["decode"].endpoint) as dc,
        ):
            res = worker_pb2_grpc.WorkerStub(pc).Prefill(
                worker_pb2.PrefillRequest(
                    request_id="e2e", prompt_token_ids=prompt, sampling=params
                ),
                timeout=60,
            )
            chunks = list(
                worker_pb2_grpc.WorkerStub(dc).Decode(
                    worker_pb2.DecodeRequest(
                        request_id="e2e",
                        prompt_token_ids=prompt,
                        kv=res.kv,
                        first_token_id=res.first_token_id,
                        sampling=params,
                    ),
                    timeout=60,
                )
            )
        assert sum(len(c.token_ids) for c in chunks) == 7
        assert chunks[-1].finish_reason == "length"

        # the README's request: the gateway with the demo tenant's key
        key = (state / "demo-api-key").read_text().strip()
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
            data=json.dumps(
                {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 8, "ignore_eos": True}
            ).encode(),
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            method="POST",
        )  # fmt: skip
        body = wait_until(lambda: _post(request), 60, interval_s=1.0, what="the gateway answers")
        assert body is not None
        assert body["usage"]["completion_tokens"] == 8
        assert body["choices"][0]["message"]["role"] == "assistant"

        # the official openai client, streamed, through the Ray-placed prefill and decode
        # workers: the same greedy text as unstreamed, with usage
        import openai

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=key, max_retries=0,
            timeout=120,
        )  # fmt: skip
        messages: Any = [{"role": "user", "content": "Tell me about KV caches."}]
        whole = client.chat.completions.create(
            model="tiny-llama", messages=messages, max_tokens=10, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        parts: list[str] = []
        usage = None
        for ev in client.chat.completions.create(
            model="tiny-llama", messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        ):  # fmt: skip
            usage = ev.usage or usage
            parts.extend(ch.delta.content or "" for ch in ev.choices)
        assert "".join(parts) == whole.choices[0].message.content
        assert usage is not None and usage.completion_tokens == 10
        assert whole.usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0 or proc.returncode in (2, -signal.SIGINT)
        wait_until(
            lambda: not [n for n, p in pids.items() if pid_alive(p)], 15, what="all pids gone"
        )
        assert not (state / "up.pids").exists()
        assert "[switchboard up] stopped" in log_path.read_text()

        # `make up` again on the same state: a new Ray cluster, so new Ray node ids; the
        # stored placements name the old ones, and the control plane places the workers again
        # (before, their groups waited forever for the old Ray nodes and nothing served)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ["make", "up", f"UP_ARGS={up_args}"], cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        first = set(workers)

        def replaced() -> set[str]:
            try:
                new = set(list_workers(f"127.0.0.1:{etcd_port}")) - first
            except (grpc.aio.AioRpcError, SwitchboardError, OSError):
                return set()  # etcd is not up again yet
            # both replicas (one placed twice leaves an extra record until its lease ends)
            return new if len(new) >= 2 else set()

        try:
            wait_until(replaced, 180, what="both workers placed again and registered")
        except AssertionError as e:  # say why: make up's own log and the control plane's
            logs = [log_path, state / "logs" / "controlplane.log"]
            tails = [f"--- {p.name} ---\n" + _tail(p) for p in logs]
            raise AssertionError("\n".join([str(e), *tails])) from None
        body = wait_until(
            lambda: _post(request), 60, interval_s=1.0, what="the gateway answers again"
        )
        assert body is not None and body["usage"]["completion_tokens"] == 8
        pids = {k: int(v) for k, v in json.loads((state / "up.pids").read_text()).items()}
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0 or proc.returncode in (2, -signal.SIGINT)
        wait_until(
            lambda: not [n for n, p in pids.items() if pid_alive(p)], 15, what="all pids gone"
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in pids.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
