"""The gateway's Prometheus metrics, each defined once, in the gateway's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 1.0, 2.0,
)  # fmt: skip


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "switchboard_gateway_requests",
            "Requests answered, by route, status (HTTP code or gRPC code name) and model.",
            ["route", "status", "model"],
            registry=r,
        )
        self.ttft = Histogram(
            "switchboard_gateway_time_to_first_token_seconds",
            "From the request reaching the token path to its first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "switchboard_gateway_inter_token_latency_seconds",
            "Time between tokens after the first (a chunk's gap spread over its tokens).",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "switchboard_gateway_in_flight_requests", "Generation requests in flight.", registry=r
        )
        self.migrations = Counter(
            "switchboard_gateway_migrations",
            "Requests moved to another worker mid-stream after their worker failed.",
            ["model"],
            registry=r,
        )
        self.retries = Counter(
            "switchboard_gateway_retries",
            "Requests sent to another worker before any token, after a worker failed.",
            ["model"],
            registry=r,
        )
        self.reprefills = Counter(
            "switchboard_gateway_kv_reprefills",
            "Decodes whose prefilled KV was gone, prefilled again.",
            ["model"],
            registry=r,
        )
        self.circuit_opened = Counter(
            "switchboard_gateway_circuit_open_events",
            "Times a worker's circuit breaker opened.",
            ["worker"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "switchboard_gateway_prompt_tokens", "Prompt tokens accepted.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "switchboard_gateway_generation_tokens", "Tokens streamed.", ["model"], registry=r
        )
        self.admission_queued = Counter(
            "switchboard_gateway_admission_queued",
            "Requests that waited in the admission queue (no free slot, or the tenant was at its"
            " max_concurrent), by model, tenant and SLA class.",
            ["model", "tenant", "sla_class"],
            registry=r,
        )
        self.admission_queue_depth = Gauge(
            "switchboard_gateway_admission_queue_depth",
            "Requests waiting in the admission queue now.",
            ["model"],
            registry=r,
        )
        self.routes = Counter(
            "switchboard_gateway_routes",
            "Routing decisions, by model, policy (sla, least_loaded, or least_loaded_fallback when"
            " the SLA router's filters left no worker) and prefill (local or remote).",
            ["model", "policy", "prefill"],
            registry=r,
        )
        self.disconnects = Counter(
            "switchboard_gateway_client_disconnects",
            "Requests whose client went away before the answer was complete.",
            registry=r,
        )
