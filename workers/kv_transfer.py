"""GrpcKvFetcher: the decode side of the CPU/sim KV hand-off, over the Worker.FetchKv stream.

Chunks are checked one by one (sequence, CRC-32) and as a whole (total size); anything off is
``KvUnavailable`` with the reason, so the caller prefills again instead of decoding from a
corrupt cache. Channels to prefill workers are kept and reused.

With ``metrics``: bytes received, transfer time and failures (by reason: kv_unavailable: gone,
evicted or corrupt, the decode prefills again; unreachable: the prefill worker). With
``tracer``: a ``kv.transfer`` client span, child of the current span (the worker's
``worker.decode``), whose context goes to the prefill worker in gRPC metadata.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import grpc
from switchboard.v1 import worker_pb2, worker_pb2_grpc

from controlplane.errors import Unavailable
from controlplane.telemetry import tracing
from controlplane.telemetry.metrics import WorkerMetrics
from controlplane.telemetry.tracing import Tracer
from workers.engine import KvHandle, KvUnavailable


class GrpcKvFetcher:
    def __init__(
        self,
        *,
        chunk_bytes: int = 1 << 20,
        timeout_s: float = 30.0,
        model: str = "",
        metrics: WorkerMetrics | None = None,
        tracer: Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._chunk_bytes = chunk_bytes
        self._timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.model = model
        self.metrics = metrics
        self.tracer = tracer
        self.clock = clock

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address,
                options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
            )
            self._channels[address] = channel
        return worker_pb2_grpc.WorkerStub(channel)

    async def fetch(self, handle: KvHandle) -> bytes:
        if self.metrics is None and self.tracer is None:
            return await self._fetch(handle, None)
        span = tracing.start_span(
            self.tracer,
            "kv.transfer",
            tracing.current_span(),
            kind=tracing.SpanKind.CLIENT,
            attributes={
                "switchboard.kv_id": handle.kv_id,
                "switchboard.source": handle.source_address,
            },
        )
        started = self.clock()
        try:
            data = await self._fetch(handle, tracing.grpc_metadata(span))
        except Exception as e:
            if self.metrics is not None:
                reason = "kv_unavailable" if isinstance(e, KvUnavailable) else "unreachable"
                self.metrics.kv_transfer_failures.labels(self.model, reason).inc()
            tracing.end_span(span, e)
            raise
        if self.metrics is not None:
            self.metrics.kv_transfer_bytes.labels(self.model, "receive").inc(len(data))
            self.metrics.kv_transfer_seconds.labels(self.model).observe(self.clock() - started)
        if span is not None:
            span.set_attribute("switchboard.kv_bytes", len(data))
        tracing.end_span(span)
        return data

    async def _fetch(self, handle: KvHandle, metadata: tuple[tuple[str, str], ...] | None) -> bytes:
        stub = self._stub(handle.source_address)
        parts: list[bytes] = []
        total = -1
        expected = 0
        try:
            call = stub.FetchKv(
                worker_pb2.FetchKvRequest(kv_id=handle.kv_id, chunk_bytes=self._chunk_bytes),
                timeout=self._timeout_s,
                metadata=metadata,
            )
            async for chunk in call:
                if chunk.sequence != expected:
                    raise KvUnavailable(
                        f"KV {handle.kv_id}: chunk {chunk.sequence} arrived, expected {expected}"
                    )
                if zlib.crc32(chunk.data) != chunk.crc32:
                    raise KvUnavailable(f"KV {handle.kv_id}: checksum mismatch in chunk {expected}")
                parts.append(chunk.data)
                total = chunk.total_bytes
                expected += 1
                if chunk.last:
                    break
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise KvUnavailable(f"KV {handle.kv_id}: {e.details()}") from None
            raise Unavailable(
                f"KV {handle.kv_id} from {handle.source_address}: {e.code().name}: {e.details()}"
            ) from None
        data = b"".join(parts)
        if total < 0 or len(data) != total:
            raise KvUnavailable(f"KV {handle.kv_id}: got {len(data)} bytes of {total}")
        return data

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
