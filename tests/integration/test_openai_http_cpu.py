"""`switchboard serve-openai --engine cpu`: the real small model behind the OpenAI API, P/D too."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.local.procs import ManagedProcess, free_port
from tests.helpers import PYTHON, wait_until
from workers.tokenizer import HfTokenizer

MODEL = "tiny-llama"


def start(tmp: Path, name: str, model: Path, role: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    port_file = tmp / f"{name}.port"
    argv = [
        PYTHON, "-m", "controlplane", "serve-openai",
        "--engine", "cpu",
        "--model-path", str(model),
        "--model", MODEL,
        "--engine-args", '{"threads": 1}',
        "--role", role,
        "--port", str(port),
        "--port-file", str(port_file),
    ]  # fmt: skip
    proc = ManagedProcess(name, argv, tmp / f"{name}.log").start()

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{name} exited:\n{proc.tail()}")
        return port_file.exists() and port_file.read_text().strip() != ""

    wait_until(ready, 60, what=f"{name} port file")
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("openai-cpu")
    procs: list[ManagedProcess] = []
    urls: dict[str, str] = {}
    try:
        for role in ("both", "prefill", "decode"):
            proc, urls[role] = start(tmp, f"cpu-{role}", tiny_model, role)
            procs.append(proc)
        yield urls
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, json=body) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return data


async def test_chat_uses_the_models_template_and_tokenizer(
    servers: dict[str, str], http: aiohttp.ClientSession, tiny_model: Path
) -> None:
    messages = [{"role": "user", "content": "Explain the KV cache in one sentence."}]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 12,
        "ignore_eos": True,
        "temperature": 0,
    }
    tok = HfTokenizer(str(tiny_model))  # before the requests: loading it can outlast keep-alive
    data = await post(http, servers["both"] + "/v1/chat/completions", body)
    prompt = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert data["usage"]["prompt_tokens"] == len(prompt)
    assert data["usage"]["completion_tokens"] == 12
    assert data["choices"][0]["finish_reason"] == "length"
    assert isinstance(data["choices"][0]["message"]["content"], str)

    # streamed: the same text, in pieces
    streamed = ""
    async with http.post(
        servers["both"] + "/v1/chat/completions", json={**body, "stream": True}
    ) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                streamed += delta.get("content") or ""
    assert streamed == data["choices"][0]["message"]["content"]


async def test_pd_over_http_equals_aggregated(
    servers: dict[str, str], http: aiohttp.ClientSession
) -> None:
    prompt = "def reconcile(desired, observed):\n    " * 20  # a few hundred tokens
    common = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 10,
        "ignore_eos": True,
        "temperature": 0,
    }
    agg = await post(http, servers["both"] + "/v1/completions", common)
    first = await post(
        http,
        servers["prefill"] + "/v1/completions",
        {**common, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
    )
    params = first["kv_transfer_params"]
    assert params
    second = await post(
        http, servers["decode"] + "/v1/completions", {**common, "kv_transfer_params": params}
    )
    assert second["choices"][0]["text"] == agg["choices"][0]["text"]
    assert second["usage"] == agg["usage"]


async def test_bad_requests_get_openai_errors(
    servers: dict[str, str], http: aiohttp.ClientSession
) -> None:
    for body, status in (
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),
        ({"model": "nope", "prompt": "x", "max_tokens": 2}, 404),
        ({"model": MODEL, "prompt": "word " * 20000, "max_tokens": 2}, 400),
    ):
        async with http.post(servers["both"] + "/v1/completions", json=body) as resp:
            data = await resp.json()
            assert resp.status == status, data
            assert data["error"]["message"]
