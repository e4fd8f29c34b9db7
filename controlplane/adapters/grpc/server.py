"""Build a grpc.aio server that serves the standard health service and reflection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

Context = grpc.aio.ServicerContext[Any, Any]


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _method_handler(servicer: object, method: MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that parses the request itself, so undecodable bytes get INVALID_ARGUMENT
    with a message (gRPC's own deserializer failure is an opaque UNKNOWN)."""
    request_cls = message_factory.GetMessageClass(method.input_type)
    impl = getattr(servicer, method.name)
    type_name = method.input_type.full_name

    async def parse(data: bytes, context: Context) -> Message:
        try:
            return request_cls.FromString(data)
        except DecodeError as e:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed {type_name}: {e or 'cannot decode'}"
            )
            raise  # unreachable: abort raises

    if method.client_streaming:
        raise NotImplementedError(f"{method.full_name}: client streaming is not used by the API")
    if method.server_streaming:

        async def stream(data: bytes, context: Context) -> AsyncIterator[Message]:
            async for item in impl(await parse(data, context), context):
                yield item

        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=_serialize)

    async def unary(data: bytes, context: Context) -> Message:
        result: Message = await impl(await parse(data, context), context)
        return result

    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=_serialize)


class GrpcServer:
    """A started-on-demand aio server with health + reflection for the given service names."""

    def __init__(self, bind: str, *, reuse_port: bool = False) -> None:
        """``reuse_port``: SO_REUSEPORT (off by default, so a taken port is an error): several
        processes serving one port, see controlplane/gateway/supervisor.py."""
        self.bind = bind
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ]
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._services: list[str] = []
        self.port = 0

    def add_servicer(self, servicer: object, service: ServiceDescriptor) -> None:
        """Serve every method of ``service`` from the same-named methods of ``servicer``."""
        handlers = {m.name: _method_handler(servicer, m) for m in service.methods}
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
        self._services.append(service.full_name)

    async def start(self, *, bind: bool = True) -> int:
        """Start serving; ``bind=False`` when the caller already added a port (to learn it
        before building what needs the address)."""
        names = [*self._services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        if bind:
            self.port = self.server.add_insecure_port(self.bind)
            if self.port == 0:
                raise OSError(f"cannot bind gRPC server to {self.bind}")
        await self.server.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._services]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
