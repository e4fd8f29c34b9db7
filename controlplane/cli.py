"""`switchboard` command line: the composition root that builds adapters and wires them in."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane import __version__
from controlplane.config import (
    DEFAULT_CONTROLPLANE,
    DEFAULT_ETCD,
    DEFAULT_PREFIX,
    ControlPlaneSettings,
    EtcdSettings,
    NodeAgentSettings,
    default_replica_id,
    env_or,
)
from controlplane.errors import SwitchboardError

if TYPE_CHECKING:
    from controlplane.gateway.main import GatewaySettings

log = logging.getLogger("switchboard")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_until_signal(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], *, use_uvloop: bool = False
) -> None:
    """Run ``main(stop)``; SIGINT / SIGTERM set ``stop``. HTTP servers run on uvloop."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    if not use_uvloop:
        asyncio.run(runner())
        return
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(runner())


def _labels(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --label {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def _etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    return EtcdSettings(endpoint=args.etcd, prefix=args.prefix)


# --- servers -----------------------------------------------------------------------------


def cmd_controlplane(args: argparse.Namespace) -> None:
    from controlplane.server import ControlPlane

    settings = ControlPlaneSettings(
        etcd=_etcd_settings(args),
        listen=args.listen,
        replica_id=args.replica_id or default_replica_id(),
        leader_ttl_s=args.leader_ttl,
        default_node_ttl_s=args.default_node_ttl,
        port_file=args.port_file or "",
        ray_address=args.ray_address or "",
        worker_lease_ttl_s=args.worker_ttl,
        metrics_port=args.metrics_port,
        planner=args.planner,
        planner_interval_s=args.planner_interval,
        planner_metrics_urls=tuple(args.planner_metrics_url or ()),
        planner_gpu_budget=args.planner_gpu_budget,
        planner_scale_down_after_s=args.planner_scale_down_after,
    )
    _run_until_signal(lambda stop: ControlPlane(settings).run(stop))


def _agent_base(args: argparse.Namespace) -> tuple[str, dict[str, str], Any]:
    """Node id, labels and GPU probe from flags / inventory file / NVML."""
    from controlplane.nodeagent.inventory import (
        DeclaredGpus,
        DeclaredProbe,
        NvmlProbe,
        declared_gpus,
        load_declared,
        nvml_available,
    )

    decl = load_declared(Path(args.inventory)) if args.inventory else None
    node_id = args.node_id or (decl.node_id if decl else "") or socket.gethostname().lower()
    labels = {**(decl.labels if decl else {}), **_labels(args.label)}
    if args.gpus is not None or decl is not None:
        base = decl.gpus if decl else DeclaredGpus()
        gpus = DeclaredGpus(
            count=args.gpus if args.gpus is not None else base.count,
            model=args.gpu_model or base.model,
            memory_gib=args.gpu_memory_gib if args.gpu_memory_gib is not None else base.memory_gib,
            used_gib=base.used_gib,
            nvlink_domain_size=(
                args.nvlink_domain_size
                if args.nvlink_domain_size is not None
                else base.nvlink_domain_size
            ),
        )
        return node_id, labels, DeclaredProbe(declared_gpus(gpus, node_id))
    if nvml_available():
        return node_id, labels, NvmlProbe(node_id)
    log.warning("no NVML and no declared GPUs: registering %s with no GPUs", node_id)
    return node_id, labels, DeclaredProbe(())


def cmd_node_agent(args: argparse.Namespace) -> None:
    from controlplane.adapters.etcd.client import EtcdClient
    from controlplane.adapters.etcd.nodes import EtcdNodeRegistry
    from controlplane.core.model import NodeInventory
    from controlplane.nodeagent.agent import NodeAgent

    try:
        node_id, labels, probe = _agent_base(args)
    except SwitchboardError as e:
        raise SystemExit(f"error: {e}") from None
    settings = NodeAgentSettings(
        etcd=_etcd_settings(args),
        node_id=node_id,
        lease_ttl_s=args.ttl,
        report_interval_s=args.report_interval,
        ray_node_id=args.ray_node_id or "",
        address=args.address or "127.0.0.1",
        metrics_port=args.metrics_port,
    )
    base = NodeInventory(
        node_id=settings.node_id,
        labels=labels,
        hostname=socket.gethostname(),
        address=settings.address,
        ray_node_id=settings.ray_node_id,
        agent_version=__version__,
    )

    async def main(stop: asyncio.Event) -> None:
        from controlplane.telemetry.http_server import MetricsServer
        from controlplane.telemetry.metrics import NodeAgentMetrics

        metrics = NodeAgentMetrics()
        metrics_server: MetricsServer | None = None
        inventory = base
        if settings.metrics_port >= 0:
            metrics_server = MetricsServer(
                metrics.registry, host=settings.address, port=settings.metrics_port
            )
            await metrics_server.start()
            inventory = dataclasses.replace(base, metrics_endpoint=metrics_server.endpoint)
        client = EtcdClient(settings.etcd.endpoint, timeout_s=settings.etcd.timeout_s)
        agent = NodeAgent(
            EtcdNodeRegistry(client, settings.etcd.prefix),
            probe,
            inventory,
            clock=time.time,
            lease_ttl_s=settings.lease_ttl_s,
            report_interval_s=settings.report_interval_s,
            metrics=metrics,
        )
        task = asyncio.create_task(agent.run())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            stopper.cancel()
            await client.close()
            if metrics_server is not None:
                await metrics_server.close()

    try:
        _run_until_signal(main)
    except SwitchboardError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_gpus(args: argparse.Namespace) -> None:
    """Print the inventory the agent would register, as JSON."""
    from controlplane.adapters.etcd.codec import gpu_to_dict

    try:
        node_id, labels, probe = _agent_base(args)
        gpus = probe.read()
    except SwitchboardError as e:
        raise SystemExit(f"error: {e}") from None
    print(
        json.dumps(
            {
                "node_id": node_id,
                "labels": labels,
                "gpus": [gpu_to_dict(g) for g in gpus],
            },
            indent=2,
        )
    )


def cmd_worker(args: argparse.Namespace) -> None:
    from workers.engine import Role
    from workers.main import WorkerSettings, run_worker

    kwargs: dict[str, Any] = {}
    if args.worker_id:
        kwargs["worker_id"] = args.worker_id
    settings = WorkerSettings(
        etcd=_etcd_settings(args),
        model=args.model,
        engine=args.engine,
        role=Role(args.role),
        profile=args.profile,
        speedup=args.speedup,
        model_path=args.model_path,
        engine_args=args.engine_args,
        listen=args.listen,
        node_id=args.node_id or "",
        lease_ttl_s=args.ttl,
        drain_timeout_s=args.drain_timeout,
        port_file=args.port_file or "",
        deployment=args.deployment,
        pool=args.pool,
        long_context_threshold_tokens=args.long_context_threshold,
        metrics_port=args.metrics_port,
        otlp_endpoint=args.otlp_endpoint,
        token_port=args.token_port,
        **kwargs,
    )
    try:
        _run_until_signal(lambda stop: run_worker(settings, stop))
    except SwitchboardError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_make_model(args: argparse.Namespace) -> None:
    from workers.engines.cpu_model import ModelShape, ensure_model, make_model

    shape = ModelShape(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        intermediate_size=args.hidden_size * 3,
    )
    try:
        out = ensure_model(args.path, shape) if args.if_missing else make_model(args.path, shape)
    except SwitchboardError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"model written to {out} ({shape.kv_bytes_per_token} bytes of KV per token)")


def cmd_serve_openai(args: argparse.Namespace) -> None:
    from workers.engine import Role
    from workers.openai_main import OpenAIServerSettings, run_openai_server

    settings = OpenAIServerSettings(
        engine=args.engine,
        model=args.model or "",
        profile=args.profile,
        speedup=args.speedup,
        model_path=args.model_path,
        engine_args=args.engine_args,
        role=Role(args.role),
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        drain_timeout_s=args.drain_timeout,
        port_file=args.port_file or "",
        otlp_endpoint=args.otlp_endpoint,
        token_port=args.token_port,
    )

    try:
        _run_until_signal(lambda stop: run_openai_server(settings, stop), use_uvloop=True)
    except (SwitchboardError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_gateway(args: argparse.Namespace) -> None:
    from controlplane.gateway.main import GatewaySettings, run_gateway

    settings = GatewaySettings(
        etcd=_etcd_settings(args),
        listen=args.listen,
        grpc_listen=args.grpc_listen,
        port_file=args.port_file or "",
        max_migrations=args.max_migrations,
        drain_timeout_s=args.drain_timeout,
        auth=args.auth,
        slots_per_worker=args.slots_per_worker,
        gateway_id=args.gateway_id,
        routing_profiles=args.routing_profiles or "",
        otlp_endpoint=args.otlp_endpoint,
        tenant_label_cap=args.tenant_label_cap,
        late_hold_factor=args.late_hold,
        worker_transport=args.worker_transport,
        processes=args.processes,
        quota_sharing=args.quota_sharing,
    )
    if settings.processes == 1:
        try:
            _run_until_signal(lambda stop: run_gateway(settings, stop), use_uvloop=True)
        except (SwitchboardError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
        return
    from controlplane.gateway.supervisor import supervise

    target = functools.partial(gateway_process, log_level=args.log_level)
    try:
        _run_until_signal(lambda stop: supervise(settings, stop, target=target))
    except (SwitchboardError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def gateway_process(settings: GatewaySettings, *, log_level: str) -> None:
    """One process of ``gateway --processes N`` (the supervisor's spawn target): serves until
    SIGTERM, then drains."""
    from controlplane.gateway.main import run_gateway
    from controlplane.gateway.supervisor import die_with_parent

    die_with_parent()
    _setup_logging(log_level)
    try:
        _run_until_signal(lambda stop: run_gateway(settings, stop), use_uvloop=True)
    except (SwitchboardError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_up(args: argparse.Namespace) -> None:
    from controlplane.local.up import LocalCluster, UpSettings

    settings = UpSettings(
        state_dir=Path(args.state_dir),
        etcd_port=args.etcd_port,
        grpc_port=args.grpc_port,
        ray_nodes=args.ray_nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_model=args.gpu_model,
        gpu_memory_gib=args.gpu_memory_gib,
        lease_ttl_s=args.ttl,
        worker_engine=args.worker_engine,
        model=args.model or ("tiny-llama" if args.worker_engine == "cpu" else "llama-3.1-8b"),
        model_path=args.model_path,
        sim_profile=args.profile,
        gateway_port=args.gateway_port,
        monitoring=args.monitoring,
        prometheus_port=args.prometheus_port,
    )
    sys.exit(LocalCluster(settings).run_foreground())


# --- clients -----------------------------------------------------------------------------


def _client_call(args: argparse.Namespace, fn: Callable[[Any], Any]) -> Any:
    import grpc

    options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    with grpc.insecure_channel(args.endpoint, options=options) as channel:
        try:
            return fn(channel)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            raise SystemExit(f"error: {code}: {details}") from None


def cmd_nodes(args: argparse.Namespace) -> None:
    from google.protobuf import json_format
    from switchboard.v1 import nodes_pb2, nodes_pb2_grpc

    from controlplane.adapters.grpc.convert import node_from_pb
    from controlplane.core.nodes import nodes_table

    resp = _client_call(
        args,
        lambda ch: nodes_pb2_grpc.NodeRegistryStub(ch).ListNodes(
            nodes_pb2.ListNodesRequest(label_selector=args.selector or ""), timeout=args.timeout
        ),
    )
    if args.output == "json":
        print(json_format.MessageToJson(resp, indent=2))
        return
    nodes = [node_from_pb(n) for n in resp.nodes]
    if not nodes:
        print("No nodes found.", file=sys.stderr)
        return
    print(nodes_table(nodes, now=time.time(), wide=args.output == "wide"))


def _scheduling_cmd(verb: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from switchboard.v1 import nodes_pb2, nodes_pb2_grpc

        def call(ch: Any) -> Any:
            stub = nodes_pb2_grpc.NodeRegistryStub(ch)
            if verb == "cordon":
                return stub.CordonNode(
                    nodes_pb2.CordonNodeRequest(node_id=args.node, reason=args.reason or ""),
                    timeout=args.timeout,
                )
            if verb == "drain":
                return stub.DrainNode(
                    nodes_pb2.DrainNodeRequest(node_id=args.node, reason=args.reason or ""),
                    timeout=args.timeout,
                )
            return stub.UncordonNode(
                nodes_pb2.UncordonNodeRequest(node_id=args.node), timeout=args.timeout
            )

        _client_call(args, call)
        print(f"node/{args.node} {verb}ed")

    return run


def cmd_status(args: argparse.Namespace) -> None:
    from google.protobuf import json_format
    from switchboard.v1 import control_plane_pb2, control_plane_pb2_grpc

    resp = _client_call(
        args,
        lambda ch: control_plane_pb2_grpc.ControlPlaneStub(ch).GetStatus(
            control_plane_pb2.GetStatusRequest(), timeout=args.timeout
        ),
    )
    print(json_format.MessageToJson(resp, indent=2, always_print_fields_with_no_presence=True))


def _deployments_cmd(name: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from controlplane import cli_deployments

        getattr(cli_deployments, f"cmd_{name}")(args, lambda fn: _client_call(args, fn))

    return run


def _explain_cmd(args: argparse.Namespace) -> None:
    if args.kind == "request":
        from controlplane import cli_explain

        cli_explain.cmd_explain_request(args)
    else:
        _deployments_cmd("explain")(args)


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchboard", description="Switchboard control plane")
    p.add_argument("--version", action="version", version=f"switchboard {__version__}")
    p.add_argument("--log-level", default=env_or("SWITCHBOARD_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def etcd_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--etcd",
            default=env_or("SWITCHBOARD_ETCD", DEFAULT_ETCD),
            help="etcd endpoint host:port (env SWITCHBOARD_ETCD)",
        )
        sp.add_argument(
            "--prefix",
            default=env_or("SWITCHBOARD_PREFIX", DEFAULT_PREFIX),
            help="etcd key prefix of this install",
        )

    def client_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--endpoint",
            default=env_or("SWITCHBOARD_CONTROLPLANE", DEFAULT_CONTROLPLANE),
            help="control plane gRPC address",
        )
        sp.add_argument("--timeout", type=float, default=10.0, help="RPC deadline, seconds")

    def otlp_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--otlp-endpoint",
            default="",
            help="export traces over OTLP gRPC to this endpoint (default: "
            "$OTEL_EXPORTER_OTLP_ENDPOINT; neither: tracing off)",
        )

    def inventory_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--node-id", help="node name (default: hostname)")
        sp.add_argument("--inventory", help="YAML file declaring node_id, labels and gpus")
        sp.add_argument("--gpus", type=int, help="declare this many GPUs instead of NVML")
        sp.add_argument("--gpu-model", help="declared GPU model")
        sp.add_argument("--gpu-memory-gib", type=float, help="declared memory per GPU, GiB")
        sp.add_argument(
            "--nvlink-domain-size", type=int, help="declared GPUs per NVLink domain (0: one domain)"
        )
        sp.add_argument(
            "--label",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="node label, e.g. zone=a or rack=r1 (repeatable)",
        )

    sp = sub.add_parser("controlplane", help="run a control-plane replica")
    etcd_flags(sp)
    sp.add_argument("--listen", default=env_or("SWITCHBOARD_LISTEN", DEFAULT_CONTROLPLANE))
    sp.add_argument("--replica-id", help="identity for leader election (default: host-pid-rand)")
    sp.add_argument("--leader-ttl", type=int, default=10, help="leader lease TTL, seconds")
    sp.add_argument(
        "--default-node-ttl",
        type=int,
        default=10,
        help="lease TTL for RegisterNode callers that ask for none",
    )
    sp.add_argument("--port-file", help="write the bound gRPC port here once serving")
    sp.add_argument(
        "--ray-address",
        default=os.environ.get("SWITCHBOARD_RAY_ADDRESS", ""),
        help="Ray GCS host:port the leader places workers on (empty: no reconciler)",
    )
    sp.add_argument("--worker-ttl", type=int, default=10, help="lease TTL of placed workers")
    sp.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="serve /metrics and /sd/targets (Prometheus http_sd of workers, node agents and "
        "gateways) on this port of the --listen host; -1: off, 0: any free port",
    )
    sp.add_argument(
        "--planner",
        choices=("off", "advisory", "on"),
        default=os.environ.get("SWITCHBOARD_PLANNER", "off"),
        help="SLA planner on the leader: off, advisory (report only) or on (scale autoscaled "
        "pools)",
    )
    sp.add_argument("--planner-interval", type=float, default=10.0, help="seconds per pass")
    sp.add_argument(
        "--planner-metrics-url",
        action="append",
        help="gateway /metrics URL to read load from (repeatable; default: every gateway "
        "registered in etcd)",
    )
    sp.add_argument(
        "--planner-gpu-budget", type=int, default=0, help="GPUs shared by priority; 0: none"
    )
    sp.add_argument(
        "--planner-scale-down-after",
        type=float,
        default=60.0,
        help="seconds load must stay low before the planner drains a replica",
    )
    sp.set_defaults(func=cmd_controlplane)

    sp = sub.add_parser("node-agent", help="register this host's GPUs and keep them registered")
    etcd_flags(sp)
    inventory_flags(sp)
    sp.add_argument("--ttl", type=int, default=10, help="lease TTL, seconds (default 10)")
    sp.add_argument(
        "--report-interval", type=float, default=5.0, help="seconds between GPU figure reports"
    )
    sp.add_argument("--ray-node-id", help="Ray node id of this host")
    sp.add_argument("--address", help="address workers on this node advertise")
    sp.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve /metrics on --address:PORT; 0: any free port (published in etcd), -1: off",
    )
    sp.set_defaults(func=cmd_node_agent)

    sp = sub.add_parser("worker", help="run an inference worker (prefill, decode or both)")
    etcd_flags(sp)
    sp.add_argument("--model", default="llama-3.1-8b", help="model name tenants use")
    sp.add_argument(
        "--engine",
        default="sim",
        choices=["cpu", "sim", "vllm", "trtllm"],
        help="cpu: a real small model on CPU; sim: calibrated simulation; vllm / trtllm: GPUs",
    )
    sp.add_argument("--model-path", default="", help="cpu, vllm, trtllm: the model directory")
    sp.add_argument("--engine-args", default="", help="engine-specific options as a JSON object")
    sp.add_argument("--role", default="both", choices=["prefill", "decode", "both"])
    sp.add_argument(
        "--profile",
        default="llama-3.1-8b-h100",
        help="sim: profile name under workers/profiles/ or a YAML path",
    )
    sp.add_argument("--speedup", type=float, default=1.0, help="sim: faster than real time")
    sp.add_argument("--listen", default="127.0.0.1:0", help="gRPC listen address")
    sp.add_argument("--worker-id", help="default: w-<random>")
    sp.add_argument("--node-id", help="the node this worker runs on")
    sp.add_argument("--ttl", type=int, default=10, help="registration lease TTL, seconds")
    sp.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, wait this long for in-flight requests",
    )
    sp.add_argument("--port-file", help="write the bound port here once serving")
    sp.add_argument("--deployment", default="", help="the deployment this worker belongs to")
    sp.add_argument(
        "--pool",
        default="",
        choices=["", "prefill", "decode", "aggregated", "long_context"],
        help="its pool kind; routers send long prompts to long_context and short ones elsewhere",
    )
    sp.add_argument(
        "--long-context-threshold",
        type=int,
        default=0,
        help="the deployment's long-context threshold in prompt tokens (0: none)",
    )
    sp.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve /metrics on this port of the --listen host; 0: any free port (published in "
        "the worker's etcd record), -1: off",
    )
    sp.add_argument(
        "--token-port",
        type=int,
        default=0,
        help="serve Prefill/Decode over the token transport on this port of the --listen host "
        "(0: any free port, published in the worker's etcd record; -1: off, gateways use gRPC)",
    )
    otlp_flag(sp)
    sp.set_defaults(func=cmd_worker)

    sp = sub.add_parser(
        "make-model",
        help="make a small random-weight Llama model + BPE tokenizer for the cpu engine",
    )
    sp.add_argument("path", help="model directory to write")
    sp.add_argument("--hidden-size", type=int, default=256)
    sp.add_argument("--layers", type=int, default=4)
    sp.add_argument(
        "--if-missing", action="store_true", help="keep an existing model of the same shape"
    )
    sp.set_defaults(func=cmd_make_model)

    sp = sub.add_parser(
        "serve-openai",
        help="serve one engine over an OpenAI-compatible HTTP API (for peer routers)",
    )
    sp.add_argument("--engine", default="sim", choices=["sim", "cpu"], help="inference engine")
    sp.add_argument("--model-path", default="", help="cpu: the model directory")
    sp.add_argument("--engine-args", default="", help="engine-specific options (JSON object)")
    sp.add_argument("--model", help="model name clients send (default: the profile's model)")
    sp.add_argument(
        "--profile",
        default="llama-3.1-8b-h100",
        help="sim: profile name under workers/profiles/ or a YAML path",
    )
    sp.add_argument("--speedup", type=float, default=1.0, help="sim: faster than real time")
    sp.add_argument(
        "--role",
        default="both",
        choices=["prefill", "decode", "both"],
        help="which half of vLLM's kv_transfer_params protocol this server serves",
    )
    sp.add_argument("--host", default="127.0.0.1", help="HTTP and gRPC listen host")
    sp.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    sp.add_argument(
        "--grpc-port", type=int, default=0, help="Worker gRPC port for KV hand-off (0: any)"
    )
    sp.add_argument(
        "--token-port",
        type=int,
        default=0,
        help="Prefill/Decode over the token transport (0: any free port; -1: off)",
    )
    sp.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, wait this long for open requests",
    )
    sp.add_argument(
        "--port-file", help='write "<http port> <grpc port> <token port>" here once serving'
    )
    otlp_flag(sp)
    sp.set_defaults(func=cmd_serve_openai)

    sp = sub.add_parser("gateway", help="serve tenants: OpenAI HTTP API + gRPC Inference")
    etcd_flags(sp)
    sp.add_argument("--listen", default="127.0.0.1:8000", help="HTTP host:port (port 0: any)")
    sp.add_argument(
        "--grpc-listen", default="127.0.0.1:0", help='gRPC Inference host:port ("": none)'
    )
    sp.add_argument("--max-migrations", type=int, default=2, help="worker moves per request")
    sp.add_argument(
        "--auth",
        choices=["tenants", "none"],
        default="tenants",
        help="tenants: API keys and quotas (switchboard tenants); none: admit everyone (dev only)",
    )
    sp.add_argument(
        "--slots-per-worker",
        type=int,
        default=32,
        help="requests a decoding worker takes at once before admission queues the rest",
    )
    sp.add_argument(
        "--gateway-id",
        default="",
        help="this replica's name in etcd (default <hostname>-<pid>); quotas are shared "
        "between the live replicas by demand",
    )
    sp.add_argument(
        "--drain-timeout", type=float, default=30.0, help="on SIGTERM, wait for open requests"
    )
    sp.add_argument("--port-file", help='write "<http port> <grpc port>" here once serving')
    sp.add_argument(
        "--processes",
        type=int,
        default=1,
        help="gateway processes on this host, all on the same ports (SO_REUSEPORT), each a "
        "replica; one per core the gateway may use",
    )
    sp.add_argument(
        "--quota-sharing",
        choices=["demand", "even"],
        default="demand",
        help="how replicas share each tenant's quotas: demand = each replica's part follows "
        "what its clients ask (a tenant that reaches one replica gets its whole quota); even = "
        "each enforces limit / replicas",
    )
    sp.add_argument(
        "--late-hold",
        type=float,
        default=4.0,
        metavar="FACTOR",
        help="late lane: a request predicted to miss its TTFT target waits while others that "
        "can still make theirs go first, at most FACTOR x its class's TTFT target (0: off)",
    )
    sp.add_argument(
        "--worker-transport",
        choices=["token", "grpc"],
        default="token",
        help="how requests reach workers: token = their token transport where they have one "
        "(one multiplexed connection per worker), else gRPC; grpc = always gRPC",
    )
    sp.add_argument(
        "--routing-profiles",
        help="YAML: the SLA router's scorers and weights per deployment and SLA class "
        "(default: the built-in ones, written out in docs/routing-profiles.yaml)",
    )
    otlp_flag(sp)
    sp.add_argument(
        "--tenant-label-cap",
        type=int,
        default=100,
        help="distinct tenants named in metric labels; later ones are reported as 'other'",
    )
    sp.set_defaults(func=cmd_gateway)

    sp = sub.add_parser("gpus", help="print the GPU inventory the node agent would register")
    inventory_flags(sp)
    sp.set_defaults(func=cmd_gpus)

    sp = sub.add_parser("nodes", help="list nodes (kubectl style)")
    client_flags(sp)
    sp.add_argument("-l", "--selector", help="label selector, e.g. zone=a,rack!=r2")
    sp.add_argument("-o", "--output", choices=["table", "wide", "json"], default="table")
    sp.set_defaults(func=cmd_nodes)

    for verb, helptext in (
        ("cordon", "stop placing new workers on a node"),
        ("uncordon", "allow placements on a node again"),
        ("drain", "cordon a node and move its workers elsewhere"),
    ):
        sp = sub.add_parser(verb, help=helptext)
        client_flags(sp)
        sp.add_argument("node")
        if verb != "uncordon":
            sp.add_argument("--reason", help="why (shown in `switchboard nodes -o json`)")
        sp.set_defaults(func=_scheduling_cmd(verb))

    sp = sub.add_parser("apply", help="create or update deployments from a YAML file")
    client_flags(sp)
    sp.add_argument(
        "-f", "--file", required=True, help="YAML file (one or more documents; - reads stdin)"
    )
    sp.add_argument("--dry-run", action="store_true", help="validate only")
    sp.set_defaults(func=_deployments_cmd("apply"))

    sp = sub.add_parser("get", help="list deployments: switchboard get deployments [NAME]")
    client_flags(sp)
    sp.add_argument("kind", choices=["deployments", "deployment", "deploy"])
    sp.add_argument("name", nargs="?", default="")
    sp.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sp.set_defaults(func=_deployments_cmd("get"))

    for verb, what in (
        ("describe", "a deployment's spec, pools and conditions"),
        ("explain", "why each replica is where it is, or why it is not placed"),
        ("delete", "delete a deployment (its workers are drained)"),
    ):
        sp = sub.add_parser(verb, help=f"{verb} deployment NAME: {what}")
        client_flags(sp)
        sp.add_argument("kind", choices=["deployment", "deploy"])
        sp.add_argument("name")
        sp.set_defaults(func=_deployments_cmd(verb))
    # explain request ID: a recent request's routing decisions, from a gateway
    explain = sub.choices["explain"]
    for action in explain._actions:
        if action.dest == "kind":
            action.choices = ["deployment", "deploy", "request"]
    from controlplane import cli_explain

    cli_explain.add_flags(explain)
    explain.set_defaults(func=_explain_cmd)

    sp = sub.add_parser("scale", help="scale deployment NAME --role decode --replicas N")
    client_flags(sp)
    sp.add_argument("kind", choices=["deployment", "deploy"])
    sp.add_argument("name")
    sp.add_argument("--role", required=True, help="prefill, decode, aggregated or long_context")
    sp.add_argument("--replicas", type=int, required=True)
    sp.set_defaults(func=_deployments_cmd("scale"))

    sp = sub.add_parser("status", help="show a control-plane replica's status")
    client_flags(sp)
    sp.set_defaults(func=cmd_status)

    from controlplane import cli_tenants

    cli_tenants.add_parser(sub, etcd_flags)

    sp = sub.add_parser("up", help="run Switchboard locally: etcd, Ray, node agents, control plane")
    sp.add_argument("--state-dir", default=".switchboard", help="data, logs and pid files")
    sp.add_argument("--etcd-port", type=int, default=2379)
    sp.add_argument("--grpc-port", type=int, default=50051, help="control plane gRPC port")
    sp.add_argument("--gateway-port", type=int, default=8000, help="gateway HTTP (OpenAI API) port")
    sp.add_argument("--ray-nodes", type=int, default=2)
    sp.add_argument("--gpus-per-node", type=int, default=4)
    sp.add_argument("--gpu-model", default="NVIDIA H100 80GB HBM3")
    sp.add_argument("--gpu-memory-gib", type=float, default=80.0)
    sp.add_argument("--ttl", type=int, default=10, help="node lease TTL, seconds")
    sp.add_argument(
        "--worker-engine",
        default="cpu",
        choices=["cpu", "sim"],
        help="engine of the local workers: cpu (real small model) or sim (simulated)",
    )
    sp.add_argument("--model", default="", help="model name the workers serve")
    sp.add_argument(
        "--model-path", default="", help="cpu: model directory (default: made on first use)"
    )
    sp.add_argument("--profile", default="llama-3.1-8b-h100", help="sim: engine profile")
    sp.add_argument(
        "--monitoring",
        action="store_true",
        help="also run Prometheus scraping every component, with the alert rules loaded",
    )
    sp.add_argument("--prometheus-port", type=int, default=9090, help="with --monitoring")
    sp.set_defaults(func=cmd_up)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    args.func(args)


if __name__ == "__main__":
    main()
