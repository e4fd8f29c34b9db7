"""`switchboard serve-openai` as real processes on 127.0.0.1, driven by an HTTP client.

The simulated engine runs the ``tiny-test`` profile (vocab 1000, context 2048, 64 KV blocks of
16 tokens). ``SimTokenizer`` decodes every token to exactly one word, so a text's word count is
its token count. No test asserts how long anything takes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.errors import Unavailable
from controlplane.local.procs import ManagedProcess, free_port
from tests.helpers import PYTHON, wait_until
from workers.engine import SamplingParams, TokenChunk
from workers.engines.sim_core import sample_token
from workers.openai_http import OpenAIApp
from workers.tokenizer import SimTokenizer

MODEL = "switchboard/tiny-test"
PROMPT = "The quick brown fox jumps over the lazy dog, again and again, until the end of time."


@dataclass
class Server:
    process: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(
    tmp: Path, name: str, *, role: str = "both", speedup: float = 100.0, extra: Sequence[str] = ()
) -> Server:
    port = free_port()
    port_file = tmp / f"{name}.port"
    argv = [
        PYTHON, "-m", "controlplane", "serve-openai",
        "--engine", "sim",
        "--profile", "tiny-test",
        "--speedup", str(speedup),
        "--role", role,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--port-file", str(port_file),
        *extra,
    ]  # fmt: skip
    proc = ManagedProcess(name, argv, tmp / f"{name}.log").start()

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{name} exited:\n{proc.tail()}")
        return port_file.exists() and port_file.read_text().strip() != ""

    wait_until(ready, 30, what=f"{name} port file")
    assert int(port_file.read_text().split()[0]) == port
    return Server(proc, port)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("openai")
    started: dict[str, Server] = {}
    try:
        started["agg"] = start_server(tmp, "agg")
        started["prefill"] = start_server(tmp, "prefill", role="prefill")
        started["decode"] = start_server(tmp, "decode", role="decode")
        # Slow enough that a long request is still running when its client goes away.
        started["slow"] = start_server(tmp, "slow", speedup=0.5)
        yield started
    finally:
        for server in started.values():
            server.process.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    server: Server,
    path: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    async with http.post(server.url + path, data=data, headers=hdrs) as resp:
        return resp.status, await resp.json()


async def stream(
    http: aiohttp.ClientSession, server: Server, path: str, body: dict[str, Any]
) -> list[dict[str, Any] | str]:
    """The SSE events of a streamed answer: parsed JSON objects, and "[DONE]" as a string."""
    events: list[dict[str, Any] | str] = []
    async with http.post(server.url + path, json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["content-type"] == "text/event-stream"
        buffer = await resp.read()
    for block in buffer.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def metrics(http: aiohttp.ClientSession, server: Server) -> dict[str, float]:
    """Samples of /metrics by name (first sample of each name; labels dropped)."""
    async with http.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            out.setdefault(name_labels.split("{", 1)[0], float(value))
    return out


def assert_openai_error(status: int, body: dict[str, Any], want_status: int) -> dict[str, Any]:
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


# --- happy paths ---------------------------------------------------------------------------------


async def test_completion(servers: dict[str, Server], http: aiohttp.ClientSession) -> None:
    status, body = await post(
        http, servers["agg"], "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "seed": 1},
    )  # fmt: skip
    assert status == 200, body
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert len(choice["text"].split()) == 12
    usage = body["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert "kv_transfer_params" not in body


async def test_chat_completion(servers: dict[str, Server], http: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
    ]
    status, body = await post(
        http, servers["agg"], "/v1/chat/completions",
        {"model": MODEL, "messages": messages, "max_completion_tokens": 7, "seed": 1},
    )  # fmt: skip
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 7
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7


async def test_streamed_completion_with_usage(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    body = {
        "prompt": PROMPT, "max_tokens": 20, "seed": 4,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    events = await stream(http, servers["agg"], "/v1/completions", body)
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert isinstance(usage_event, dict)
    assert usage_event["choices"] == []
    chunks = [e for e in events[:-2] if isinstance(e, dict)]
    assert len(chunks) == len(events) - 2
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in chunks} | {usage_event["id"]}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert usage_event["usage"]["completion_tokens"] == len(text.split()) == 20
    # The same request unstreamed gives the same text.
    _, whole = await post(
        http, servers["agg"], "/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "seed": 4}
    )
    assert whole["choices"][0]["text"] == text


async def test_streamed_chat(servers: dict[str, Server], http: aiohttp.ClientSession) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 9, "seed": 2}
    events = await stream(http, servers["agg"], "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text.split()) == 9
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_same_seed_same_output(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    async def text(seed: int) -> str:
        body = {"prompt": PROMPT, "max_tokens": 16, "seed": seed, "temperature": 0.7}
        status, out = await post(http, servers["agg"], "/v1/completions", body)
        assert status == 200, out
        return str(out["choices"][0]["text"])

    assert await text(11) == await text(11)
    assert await text(11) != await text(12)


async def test_stop_strings_and_stop_token_ids(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    base = {"prompt": PROMPT, "max_tokens": 30, "seed": 5}
    _, full = await post(http, servers["agg"], "/v1/completions", base)
    words = full["choices"][0]["text"].split()
    stop = f" {words[3]} {words[4]}"  # spans two tokens
    _, cut = await post(http, servers["agg"], "/v1/completions", {**base, "stop": [stop]})
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == full["choices"][0]["text"].split(stop)[0]
    events = await stream(http, servers["agg"], "/v1/completions", {**base, "stop": stop})
    streamed = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict))
    assert streamed == cut["choices"][0]["text"]
    # A stop token id ends generation in the engine: the sim samples the token at position p
    # as sample_token(seed, p), so the fifth generated token is known in advance.
    fifth = sample_token("5", 3 + 4, 1000)
    _, tokens = await post(
        http, servers["agg"], "/v1/completions",
        {"prompt": [5, 6, 7], "max_tokens": 30, "seed": 5, "stop_token_ids": [fifth]},
    )  # fmt: skip
    assert tokens["choices"][0]["finish_reason"] == "stop"
    assert tokens["usage"]["completion_tokens"] == 5


async def test_token_id_prompts_and_concurrent_requests(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    async def one(i: int) -> int:
        body = {"prompt": [i % 1000 for i in range(i, i + 40)], "max_tokens": 8 + i % 5}
        events = await stream(http, servers["agg"], "/v1/completions", body)
        text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict))
        assert events[-1] == "[DONE]"
        return len(text.split()) - (8 + i % 5)

    assert await asyncio.gather(*(one(i) for i in range(32))) == [0] * 32  # bounded: 32 requests


async def test_models_health_and_metrics(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    async with http.get(servers["agg"].url + "/v1/models") as resp:
        assert resp.status == 200
        models = await resp.json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 2048
    async with http.get(servers["agg"].url + "/health") as resp:
        assert resp.status == 200
    for _ in range(2):
        await post(http, servers["agg"], "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    m = await metrics(http, servers["agg"])
    for name in (
        "switchboard_engine_running_requests",
        "switchboard_engine_waiting_requests",
        "switchboard_engine_kv_cache_usage_ratio",
        "switchboard_engine_prefix_cache_hit_rate",
        "switchboard_http_requests_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert name in m, name
    assert m["switchboard_engine_kv_blocks_total"] == 64
    assert m["switchboard_http_generation_tokens_total"] >= 2
    # The same prompt again hits the prefix cache.
    assert m["switchboard_engine_prefix_cache_hit_rate"] > 0


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model"),
        ("/v1/completions", {"prompt": "", "max_tokens": 1}, 400, None),
        ("/v1/completions", {"prompt": [1, 2, 5000]}, 400, None),
        ("/v1/completions", {"prompt": [i % 1000 for i in range(2100)]}, 400, None),
        ("/v1/completions", {"prompt": [1] * 1000, "max_tokens": 100}, 400, None),
        ("/v1/chat/completions", {"max_tokens": 5}, 400, "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400,
         "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "stream": "yes"}, 400, "stream"),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_errors(
    servers: dict[str, Server],
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any] | bytes,
    status: int,
    param: str | None,
) -> None:
    got, out = await post(http, servers["agg"], path, body)
    err = assert_openai_error(got, out, status)
    assert err["param"] == param
    if param is not None:
        assert param.split(".")[0] in err["message"]


async def test_stream_errors_come_before_the_stream(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    body = {"prompt": [i % 1000 for i in range(2100)], "max_tokens": 4, "stream": True}
    got, out = await post(http, servers["agg"], "/v1/completions", body)
    err = assert_openai_error(got, out, 400)
    assert "context window" in err["message"]


async def test_unknown_routes_and_methods(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    async with http.get(servers["agg"].url + "/v1/nothing") as resp:
        assert_openai_error(resp.status, await resp.json(), 404)
    async with http.get(servers["agg"].url + "/v1/completions") as resp:
        assert_openai_error(resp.status, await resp.json(), 405)
        assert resp.headers["allow"] == "POST"


# --- client disconnects --------------------------------------------------------------------------


async def test_client_disconnect_mid_stream_aborts_the_request(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    slow = servers["slow"]
    body = json.dumps({"prompt": [7] * 50, "max_tokens": 900, "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", slow.port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.readuntil(b"\n\n"), 30)  # the first tokens have arrived
    assert (await metrics(http, slow))["switchboard_engine_running_requests"] == 1
    writer.close()
    await writer.wait_closed()

    async def running() -> float:
        return (await metrics(http, slow))["switchboard_engine_running_requests"]

    for _ in range(200):  # bounded: 200 polls
        if await running() == 0:
            break
        await asyncio.sleep(0.05)
    m = await metrics(http, slow)
    assert m["switchboard_engine_running_requests"] == 0
    assert m["switchboard_http_client_disconnects_total"] == 1
    assert m["switchboard_http_generation_tokens_total"] < 900  # aborted, not finished
    assert m["switchboard_engine_kv_blocks_used"] == 0  # its KV is free


# --- prefill/decode over HTTP (vLLM's kv_transfer_params protocol) -------------------------------

PREFILL_PARAMS = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None,
}  # fmt: skip


async def pd_request(
    http: aiohttp.ClientSession,
    servers: dict[str, Server],
    path: str,
    request: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What vllm-router --vllm-pd-disaggregation does: the prefill half, then the decode half."""
    prefill_body = {
        **request, "max_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_PARAMS,
    }  # fmt: skip
    status, prefilled = await post(http, servers["prefill"], path, prefill_body, headers)
    assert status == 200, prefilled
    params = prefilled["kv_transfer_params"]
    decode_body = {**request, "kv_transfer_params": params, "min_tokens": None}
    status, decoded = await post(http, servers["decode"], path, decode_body, headers)
    assert status == 200, decoded
    return prefilled, decoded


async def test_disaggregated_completion_equals_aggregated(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    request = {"model": MODEL, "prompt": PROMPT * 3, "max_tokens": 24, "seed": 21}
    prefilled, decoded = await pd_request(http, servers, "/v1/completions", request)
    assert prefilled["usage"]["completion_tokens"] == 1
    params = prefilled["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_host"] == "127.0.0.1" and isinstance(params["remote_port"], int)
    assert params["switchboard_kv"]["num_tokens"] == prefilled["usage"]["prompt_tokens"]
    _, aggregated = await post(http, servers["agg"], "/v1/completions", request)
    assert decoded["choices"][0]["text"] == aggregated["choices"][0]["text"]
    assert decoded["usage"] == aggregated["usage"]
    assert prefilled["choices"][0]["text"] == " " + aggregated["choices"][0]["text"].split()[0]


async def test_disaggregated_chat_streams_with_the_router_request_id(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    # No seed: tokens follow the request id, which the router sends to both halves.
    request = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10}
    headers = {"X-Request-Id": "router-req-1"}
    prefill_body = {**request, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS}
    _, prefilled = await post(
        http, servers["prefill"], "/v1/chat/completions", prefill_body, headers
    )
    params = prefilled["kv_transfer_params"]
    async with http.post(
        servers["decode"].url + "/v1/chat/completions",
        json={**request, "stream": True, "kv_transfer_params": params},
        headers=headers,
    ) as resp:
        assert resp.status == 200
        raw = (await resp.read()).decode()
    chunks = [json.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")]
    assert raw.rstrip().endswith("data: [DONE]")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    _, aggregated = await post(http, servers["agg"], "/v1/chat/completions", request, headers)
    assert streamed == aggregated["choices"][0]["message"]["content"]
    assert len(streamed.split()) == 10


async def test_decode_prefills_itself_when_the_kv_is_gone(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    request = {"prompt": PROMPT, "max_tokens": 6, "seed": 3}
    prefilled, first = await pd_request(http, servers, "/v1/completions", request)
    before = (await metrics(http, servers["decode"]))["switchboard_http_kv_fetch_fallbacks_total"]
    # The KV was handed over once; asking again finds it gone, and the decode server recomputes.
    body = {**request, "kv_transfer_params": prefilled["kv_transfer_params"]}
    status, again = await post(http, servers["decode"], "/v1/completions", body)
    assert status == 200, again
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    after = (await metrics(http, servers["decode"]))["switchboard_http_kv_fetch_fallbacks_total"]
    assert after == before + 1


async def test_roles_refuse_the_other_half(
    servers: dict[str, Server], http: aiohttp.ClientSession
) -> None:
    body = {"prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS}
    got, out = await post(http, servers["decode"], "/v1/completions", body)
    assert_openai_error(got, out, 400)
    decode_params = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 1}
    body = {"prompt": PROMPT, "kv_transfer_params": decode_params}
    got, out = await post(http, servers["prefill"], "/v1/completions", body)
    assert_openai_error(got, out, 400)
    got, out = await post(http, servers["decode"], "/v1/completions", body)
    err = assert_openai_error(got, out, 400)
    assert err["param"] == "kv_transfer_params.switchboard_kv"
    # Plain requests are served by every role.
    got, out = await post(http, servers["prefill"], "/v1/completions", {"prompt": PROMPT})
    assert got == 200, out


# --- shutdown ------------------------------------------------------------------------------------


def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    server = start_server(tmp_path, "short-lived")
    server.process.stop(grace_s=20)
    assert server.process.proc is not None
    assert server.process.proc.returncode == 0, server.process.tail()
    assert "stopped" in server.process.tail()


# --- in process: what a real engine rarely does --------------------------------------------------


class FailingEngine:
    """Streams two tokens, then fails as a lost worker would."""

    model = "failing"
    max_context_tokens = 100
    vocab_size = 1000

    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def generate(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> AsyncIterator[TokenChunk]:
        yield TokenChunk((1,))
        yield TokenChunk((2,))
        raise Unavailable("the engine went away")

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return True


async def call_app(app: OpenAIApp, body: bytes) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    await app(scope, receive, send)  # type: ignore[arg-type]
    done.set()
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_an_engine_failure_mid_stream_ends_the_stream_with_an_error() -> None:
    engine = FailingEngine()
    app = OpenAIApp(engine, SimTokenizer(1000))  # type: ignore[arg-type]
    status, raw = await call_app(app, b'{"prompt": "hi", "max_tokens": 5, "stream": true}')
    assert status == 200
    events = [e[len("data: ") :] for e in raw.decode().split("\n\n") if e]
    assert len(events) == 4
    assert json.loads(events[2])["error"]["type"] == "service_unavailable_error"
    assert events[3] == "[DONE]"
    assert len(engine.aborted) == 1  # the request is ended in the engine too
    status, raw = await call_app(app, b'{"prompt": "hi", "max_tokens": 5}')
    assert status == 503
    assert json.loads(raw)["error"]["message"] == "the engine went away"


async def test_too_large_bodies_are_refused() -> None:
    app = OpenAIApp(FailingEngine(), SimTokenizer(1000), max_body_bytes=100)  # type: ignore[arg-type]
    status, raw = await call_app(app, json.dumps({"prompt": "x" * 200}).encode())
    assert status == 413
    assert "100 bytes" in json.loads(raw)["error"]["message"]
