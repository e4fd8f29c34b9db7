"""The gateway's token path: route, prefill -> decode, retry, migrate, abort.

Theory of operation
-------------------
``Gateway.stream`` turns (model, prompt ids, sampling) into an async stream of ``TokenChunk``,
the same type engines yield, so the shared OpenAI response writers (workers/openai_protocol.py)
and the gRPC Inference service consume it unchanged. For one request:

1. **route** with a snapshot of the model's workers (``WorkersView.snapshots``: records, last load
   reports, this gateway's in-flight counts, breaker states). A model with a timing model (a
   sim deployment's profile, ``model_routing.py``) goes through the SLA-aware router
   (``SlaGatewayRouter.route_request``) with a ``RouteRequest``: prompt length, the prompt's
   chained block hashes at the model's KV block size, ``max_tokens``, the SLA class's TTFT /
   ITL targets (the admission ticket's class; ``standard`` when none), tenant. When its filters
   leave no worker (e.g. no worker has KV room for prompt + ``max_tokens`` by its last report)
   the request is routed least loaded anyway, as before, and the engine queues it. A model
   without a timing model (cpu, vllm, trtllm today) is routed by the ``Router`` (least
   loaded). Both are pure and read memory only; no route -> ``Unavailable`` (503).
2. **disaggregated** (route has a prefill worker): ``Prefill`` on it; its first token is yielded at
   once (TTFT does not wait for the decode worker); then ``Decode`` with the ``KvHandle`` on the
   decode worker. If the decode worker answers NOT_FOUND before its first token (the KV expired,
   was evicted, or its prefill worker restarted: ``KvUnavailable``), the prompt is prefilled
   again **once** and decoded with the token already sent as ``first_token_id`` (the KV of a
   prompt does not depend on the token sampled after it, so nothing is sent twice).
   **aggregated** (no prefill worker): ``Decode`` without a handle; a one-token attempt
   (``max_tokens`` 1) uses the unary ``DecodeUnary`` instead (half the gateway's gRPC CPU of
   a stream; a worker without it answers UNIMPLEMENTED and gets the stream).
3. **failures**: UNAVAILABLE (and the other transport codes: the stream broke, the worker died or
   is draining) count against the worker's circuit breaker and the request moves on, **excluding
   that worker**, as an aggregated request whose prompt is the original prompt + every token
   already sent and whose ``max_tokens`` is what is left. Before the first token that is a retry;
   after it, a **migration**: the client's stream goes on with no gap and no duplicate, and
   with greedy decoding the text equals an unbroken run. At most ``max_migrations`` moves per
   request, then ``Unavailable`` naming the last failure (an error event in an SSE stream).
   Errors that are the request's fault (INVALID_ARGUMENT, ...) are not retried.
4. **stop token ids** are applied here: the Worker API's sampling has no stop ids, so the
   gateway ends the stream at the first one (finish "stop") and aborts the worker's request.
5. **the end**: when the consumer stops early (client disconnect -> cancellation, stop string,
   stop id), the generator's ``finally`` cancels the open Decode call and sends ``Abort`` to the
   decode worker and, while the prefilled KV has not been handed over, to the prefill worker, so
   their KV is freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from switchboard.v1 import inference_pb2, worker_pb2

from controlplane.core.routing import DecodeProgress, RouteRequest, Trace
from controlplane.core.routing.late import NO_HOLD, LatePolicy, Prediction
from controlplane.core.routing.plugins import LONG_CONTEXT_POOL
from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass, index_sla_classes
from controlplane.core.tenants import DEFAULT_SLA_CLASS
from controlplane.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SwitchboardError,
    Unavailable,
)
from controlplane.gateway.decisions import DecisionLog
from controlplane.gateway.errors import RateLimited
from controlplane.gateway.late_lane import LateLane
from controlplane.gateway.model_routing import DEFAULT_SIM_PROFILE, ModelRoutingCache
from controlplane.gateway.routing import CircuitBreakers, NoRoute, Route, Router, WorkerSnapshot
from controlplane.gateway.sla_routing import Held, SlaGatewayRouter, route_summary
from controlplane.gateway.token_client import TokenRpcError
from controlplane.gateway.workers_view import ModelInfo, WorkersView
from controlplane.telemetry import tracing
from controlplane.telemetry.metrics import UNKNOWN, GatewayMetrics, SloTargets, TokenTimer
from controlplane.telemetry.tracing import Span, Tracer
from workers.engine import KvUnavailable, SamplingParams, TokenChunk, validate_prompt
from workers.engines.sim_core import hash_blocks
from workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# Codes that mean "this worker failed", not "this request is bad": move the request elsewhere.
_TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.FAILED_PRECONDITION,  # wrong role / draining race: another worker can
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


_DecodeCall = AsyncGenerator[worker_pb2.DecodeChunk, None] | grpc.aio.UnaryStreamCall[Any, Any]
"""A decode stream: the token transport's generator or a gRPC call."""


OUTPUT_TOKENS_WEIGHT = 0.05
"""Each completed request's weight in its class's mean output length (the ITL budgets'
horizon, ``predict.itl_budget_ms``): about the last 20 requests."""


class WorkerFailed(Exception):
    """A worker failed this request in a way another worker may not (transport, draining)."""

    def __init__(self, worker_id: str, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(f"worker {worker_id}: {detail}")
        self.worker_id = worker_id
        self.detail = detail
        self.timed_out = timed_out
        """The call ran past its deadline (``--decode-timeout`` and the like)."""


def _translate(e: grpc.aio.AioRpcError | TokenRpcError, worker_id: str) -> Exception:
    code, details = e.code(), e.details() or e.code().name
    if code in _TRANSPORT_CODES:
        return WorkerFailed(
            worker_id,
            f"{code.name}: {details}",
            timed_out=code is grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    if code is grpc.StatusCode.NOT_FOUND:
        return KvUnavailable(details)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(details)
    return Unavailable(f"worker {worker_id}: {code.name}: {details}")


@dataclass(slots=True)
class Progress:
    """What a request has served so far (read by the caller for usage and ``release``)."""

    tokens: int = 0
    migrations: int = 0
    worker_ids: tuple[str, ...] = ()
    explain_route: bool = False
    """Set by the caller: fill ``route`` (the ``X-Switchboard-Route`` debug header)."""
    route: str = ""
    """With ``explain_route``: the latest routing decision, one line (``route_summary``)."""
    arrived: float | None = None
    """Set by the caller: when the request reached the gateway (``Gateway.clock``); TTFT and
    end-to-end latency count from it (default: when ``stream`` started)."""
    span: Span | None = None
    """Set by the caller when tracing is on: the request's span, parent of the router and
    worker spans (see controlplane/telemetry/tracing.py)."""
    timer: TokenTimer | None = None
    """Set by ``stream``: the request's token timing, for ``Gateway.finish``."""
    sla_class: str = ""
    """Set by ``stream``: the class the request was measured against (its effective class)."""
    failed: bool = False
    """Set by ``stream``: it raised (the request failed after admission)."""
    abort_reason: str = "error"
    """Set by ``stream`` when it gives up: ``timeout`` when the last worker call ran past
    its deadline (``switchboard_aborts_total``'s reason)."""
    tenant: str = ""
    """Set by the caller after admission: the ticket's tenant."""
    rejected: RateLimited | None = None
    """Set by the caller when admission shed the request."""


def build_tokenizer(info: ModelInfo) -> Tokenizer:
    """The tokenizer of a deployment's engine (cpu: the model's own; sim: SimTokenizer)."""
    from workers.tokenizer import HfTokenizer, SimTokenizer

    if info.engine == "sim":
        from workers.profiles import load_profile

        profile = load_profile(info.engine_args.get("profile", DEFAULT_SIM_PROFILE))
        return SimTokenizer(profile.vocab_size)
    if info.engine in ("cpu", "vllm", "trtllm") and info.model_path:
        return HfTokenizer(info.model_path)
    raise Unavailable(
        f"cannot tokenize for model {info.model!r}: engine {info.engine!r} without a model_path"
    )


class Gateway:
    """The request path over a ``WorkersView``; see the module docstring.

    Args:
        view: routing state (records, loads, channels, in-flight counts).
        router: the routing policy for models without a timing model (least loaded), and the
            fallback when the SLA router's filters leave no worker.
        sla_router: the SLA-aware router, for models with a timing model; None: ``router``
            routes every model.
        model_routing: per-model block size and timing model (default: from ``view``'s
            deployments, ``ModelRoutingCache``).
        sla_classes: model -> its SLA classes by name (default: ``DEFAULT_SLA_CLASSES`` for
            every model; the gateway passes ``DeploymentCache.sla_classes``, the deployment's
            own); a request's class sets the targets the SLA router predicts against.
        breakers: per-worker circuit breakers.
        metrics: where TTFT / ITL / migrations / circuit events go.
        max_migrations: moves to another worker per request (retries before the first token
            included) before the request fails.
        prefill_timeout_s / decode_timeout_s: gRPC deadlines.
        clock: monotonic seconds, for breakers and latency histograms.
        tracer: OpenTelemetry tracer (None: tracing off; no span is made).
        plugin_timing_every: time the router's plugins on one decision in this many
            (``switchboard_router_plugin_seconds`` is a sample; timing every decision costs
            about 25 us of histogram updates).
        tokenizer_factory: ModelInfo -> Tokenizer (cached per model).
        late_policy: when a request the SLA router predicts late is held back so that
            requests that can still meet their TTFT target go first (``NO_HOLD``: never;
            controlplane/core/routing/late.py).
        token_transport: send ``Prefill`` / ``Decode`` over a worker's token transport when
            its record has a ``token_endpoint`` (workers/token_transport.py); False: always
            its gRPC service.
    """

    def __init__(
        self,
        view: WorkersView,
        router: Router,
        breakers: CircuitBreakers,
        metrics: GatewayMetrics,
        *,
        max_migrations: int = 2,
        prefill_timeout_s: float = 120.0,
        decode_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        tokenizer_factory: Callable[[ModelInfo], Tokenizer] = build_tokenizer,
        sla_router: SlaGatewayRouter | None = None,
        model_routing: ModelRoutingCache | None = None,
        sla_classes: Callable[[str], Mapping[str, SlaClass]] | None = None,
        tracer: Tracer | None = None,
        plugin_timing_every: int = 8,
        late_policy: LatePolicy = NO_HOLD,
        token_transport: bool = True,
    ) -> None:
        self.view = view
        self.token_transport = token_transport
        self.tracer = tracer
        self.plugin_timing_every = max(1, plugin_timing_every)
        self._decisions = 0
        self.router = router
        self.sla_router = sla_router
        self.model_routing = model_routing or ModelRoutingCache(view.model_info)
        defaults = index_sla_classes(DEFAULT_SLA_CLASSES)
        self.sla_classes = sla_classes or (lambda _model: defaults)
        self.breakers = breakers
        self.metrics = metrics
        self.max_migrations = max_migrations
        self.prefill_timeout_s = prefill_timeout_s
        self.decode_timeout_s = decode_timeout_s
        self.clock = clock
        self._tokenizer_factory = tokenizer_factory
        self._tokenizers: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], Tokenizer] = {}
        self._last_tokenizer: dict[str, tuple[ModelInfo, Tokenizer]] = {}
        self._sampling_msgs: dict[
            tuple[int, float, float, int | None], inference_pb2.SamplingParams
        ] = {}
        self._no_unary: set[str] = set()
        """Worker endpoints that answered ``DecodeUnary`` with UNIMPLEMENTED."""
        self._background: set[asyncio.Task[None]] = set()
        self.decisions = DecisionLog()
        """Recent requests' routing decisions (``GET /debug/requests/{id}``)."""
        self.late_policy = late_policy
        self.late_lane = LateLane(clock=clock)
        self._decoding: dict[str, dict[int, tuple[TokenTimer, int, float, float]]] = {}
        """worker id -> this gateway's requests decoding there: (timer, max_tokens, ITL target
        ms, expected output tokens) by the request's ``id(Progress)``; their ITL budgets steer
        local prefills."""
        self._slo: dict[str, tuple[SlaClass, SloTargets]] = {}
        """SLA class name -> the class object last seen and its ``SloTargets``."""
        self._output_tokens: dict[tuple[str, str], float] = {}
        """(model, SLA class) -> output tokens of its recent completed requests (an
        exponentially weighted mean, ``OUTPUT_TOKENS_WEIGHT`` per request)."""
        if sla_router is not None and sla_router.decoding_for is None:
            sla_router.decoding_for = self.decoding_progress

    # --- model facts ----------------------------------------------------------------------------

    def tokenizer(self, model: str) -> Tokenizer:
        """The model's tokenizer (NotFound for unknown models; built once per deployment)."""
        info = self.view.model_info(model)
        last = self._last_tokenizer.get(model)
        if last is not None and info is not None and last[0] is info:
            return last[1]  # the fast path: the same deployment object as last time
        if info is None:
            if not self.view.records(model):
                raise NotFound(f"model {model!r} is not served here")
            engine = self.view.records(model)[0].engine
            info = ModelInfo(model=model, engine=engine)
        key = (info.model, info.engine, info.model_path, tuple(sorted(info.engine_args.items())))
        tok = self._tokenizers.get(key)
        if tok is None:
            tok = self._tokenizer_factory(info)
            self._tokenizers[key] = tok
        self._last_tokenizer[model] = (info, tok)
        return tok

    def max_context_tokens(self, model: str) -> int:
        return self.view.max_context_tokens(model)

    def validate(self, model: str, prompt: tuple[int, ...], sampling: SamplingParams) -> None:
        """InvalidArgument for a prompt the model's workers would refuse (before routing)."""
        ctx = self.max_context_tokens(model)
        validate_prompt(
            prompt,
            sampling,
            vocab_size=self.tokenizer(model).vocab_size,
            max_context_tokens=ctx if ctx > 0 else 1 << 30,
        )

    # --- routing --------------------------------------------------------------------------------

    def sla_class(self, model: str, name: str) -> SlaClass:
        """The class a request's targets come from: its own, else the default (``standard``),
        else the model's first class."""
        classes = self.sla_classes(model)
        cls = classes.get(name) or classes.get(DEFAULT_SLA_CLASS)
        return cls if cls is not None else next(iter(classes.values()))

    def _route(
        self,
        model: str,
        prompt: tuple[int, ...],
        max_tokens: int,
        exclude: frozenset[str],
        aggregated: bool,
        *,
        sla_class: str = "",
        tenant: str = "",
        progress: Progress | None = None,
        request_id: str = "",
    ) -> Route:
        """``_route_or_hold`` without holding: where this attempt goes."""
        route = self._route_or_hold(
            model,
            prompt,
            max_tokens,
            exclude,
            aggregated,
            sla_class=sla_class,
            tenant=tenant,
            progress=progress,
            request_id=request_id,
        )
        assert isinstance(route, Route)
        return route

    def _route_or_hold(
        self,
        model: str,
        prompt: tuple[int, ...],
        max_tokens: int,
        exclude: frozenset[str],
        aggregated: bool,
        *,
        sla_class: str = "",
        tenant: str = "",
        progress: Progress | None = None,
        request_id: str = "",
        hold_late: bool = False,
        held_s: float = 0.0,
    ) -> Route | Held:
        """Where this attempt goes (see the module docstring, 1.). Reads memory only; the
        decision goes into ``decisions`` under ``request_id``. ``hold_late``: a route whose
        predicted TTFT misses the request's class target is not made (``Held``: nothing is
        recorded; the caller holds the request in the late lane and routes it again, saying
        for how long in ``held_s``)."""
        now = self.clock()
        workers = self.view.snapshots(model, lambda w: self.breakers.allows(w, now))
        if not workers and not self.view.has_model(model):
            raise NotFound(f"model {model!r} is not served here")
        span = None
        if progress is not None and progress.span is not None:
            span = tracing.start_span(self.tracer, "router.decision", progress.span)
        explain = progress is not None and progress.explain_route
        facts = self.model_routing.get(model) if self.sla_router is not None else None
        trace: Trace | None = None
        fallback = ""
        if self.sla_router is None or facts is None or facts.timing is None:
            route = self.router.route(workers, exclude=exclude, aggregated=aggregated)
            policy, summary = "least_loaded", ""
            if explain:
                summary = route_summary(route, policy=policy)
        else:
            cls = self.sla_class(model, sla_class)
            request = RouteRequest.for_class(
                cls,
                model=model,
                prompt_tokens=len(prompt),
                max_tokens=max_tokens,
                block_size=facts.block_size,
                block_hashes=hash_blocks(prompt, facts.block_size),
                tenant=tenant,
                deployment=self.sla_router.deployment_facts(model),
            )
            timed = self._decisions % self.plugin_timing_every == 0
            self._decisions += 1
            hold: Callable[[Prediction], bool] | None = None
            if hold_late and self.late_policy.enabled and cls.ttft_p95_ms is not None:
                hold = functools.partial(self.late_policy.is_late, ttft_target_ms=cls.ttft_p95_ms)
            sla_route, trace = self.sla_router.route_request(
                request,
                workers,
                exclude=exclude,
                aggregated=aggregated,
                clock=self.clock if timed else None,
                hold=hold,
            )
            if isinstance(sla_route, Held):
                tracing.end_span(span, "held: late")
                return sla_route
            route, policy = sla_route, "sla"
            if isinstance(sla_route, NoRoute):
                # the SLA router's filters are stricter than the hard ones (KV room for every
                # output token by the last report): route least loaded; the engine queues it
                least = self.router.route(workers, exclude=exclude, aggregated=aggregated)
                if isinstance(least, Route):
                    route, policy = least, "least_loaded_fallback"
                    fallback = ",".join(dict.fromkeys(r.plugin for r in trace.decode.rejections))
            summary = ""
            if explain:
                shown = "least_loaded" if policy == "least_loaded_fallback" else policy
                summary = route_summary(
                    route, trace, policy=shown, fallback=fallback, held_s=held_s
                )
        if explain and progress is not None:
            progress.route = summary
        if request_id:
            chosen = route if isinstance(route, Route) else None
            self.decisions.record(
                request_id,
                tenant=tenant,
                model=model,
                sla_class=sla_class,
                policy=policy,
                decode=chosen.decode.worker_id if chosen else "",
                prefill=chosen.prefill.worker_id if chosen and chosen.prefill else "",
                trace=trace,
                at=time.time(),
                fallback=fallback,
            )
        if isinstance(route, NoRoute):
            tracing.end_span(span, "no route")
            raise Unavailable(route.message(model))
        block_size = facts.block_size if facts is not None else 0
        self._observe_route(model, policy, route, trace, len(prompt), block_size, now, span)
        return route

    def decoding_progress(self, worker_id: str) -> tuple[DecodeProgress, ...]:
        """This gateway's requests decoding on ``worker_id`` now (``DecodeProgress``)."""
        entries = self._decoding.get(worker_id)
        if not entries:
            return ()
        now = self.clock()
        return tuple(
            DecodeProgress(
                itl_target_ms=target,
                tokens=timer.count,
                max_tokens=max_tokens,
                elapsed_ms=0.0 if timer.first is None else (now - timer.first) * 1000.0,
                expected_tokens=expected,
            )
            for timer, max_tokens, target, expected in entries.values()
        )

    def _observe_route(
        self,
        model: str,
        policy: str,
        route: Route,
        trace: Trace | None,
        prompt_tokens: int,
        block_size: int,
        started: float,
        span: Span | None,
    ) -> None:
        """Metrics (and the span) of one routing decision: its time, each plugin's, the
        deciding plugin, the prefix-cache hit of the worker that will prefill."""
        m = self.metrics
        remote = "remote" if route.prefill is not None else "local"
        m.child(m.routes, model, policy, remote).inc()
        if (
            route.prefill is not None
            and route.decode.pool == LONG_CONTEXT_POOL
            and route.prefill.pool != LONG_CONTEXT_POOL
        ):
            m.child(m.long_context_lent, model).inc()
        m.child(m.router_decision, model, policy).observe(self.clock() - started)
        decider = policy
        hit_tokens = 0
        if trace is not None and policy == "sla":
            for stage in (trace.decode, trace.prefill):
                if stage is None:
                    continue
                for plugin, seconds in stage.plugin_seconds.items():
                    m.plugin_histogram(plugin).observe(seconds)
            decider = next(iter(trace.decode.deciders()), policy)
            prefiller = trace.prefill if route.prefill is not None else trace.decode
            if prefiller is not None and prefiller.chosen is not None:
                cached = prefiller.candidate(prefiller.chosen).cached_blocks
                hit_tokens = min(prompt_tokens, cached * block_size)
            m.child(m.prefix_query_tokens, model).inc(prompt_tokens)
            if hit_tokens:
                m.child(m.prefix_hit_tokens, model).inc(hit_tokens)
        m.child(m.router_reasons, model, decider).inc()
        if span is not None:
            span.set_attributes(
                {
                    "switchboard.policy": policy,
                    "switchboard.decode_worker": route.decode.worker_id,
                    "switchboard.prefill_worker": (
                        route.prefill.worker_id if route.prefill is not None else ""
                    ),
                    "switchboard.decider": decider,
                    "switchboard.prefix_hit_tokens": hit_tokens,
                }
            )
            span.end()

    def finish(
        self,
        route: str,
        status: str,
        model: str,
        progress: Progress,
        *,
        error: bool,
        disconnected: bool = False,
    ) -> str | None:
        """Count one request's end, once, when its answer is over: ``requests_total``; for an
        admitted request its SLO (``judge_slo``, controlplane/telemetry/metrics.py: met, or
        missed for ttft / itl / error), for a shed one an SLO miss ``shed``; aborts; and end
        its span. ``error``: it failed (any non-success answer); ``disconnected``: the client
        left. Returns the SLO miss reason (None: met, or not counted)."""
        m = self.metrics
        tenant, cls = progress.tenant, progress.sla_class
        failed = error or disconnected or progress.failed
        reason: str | None = None
        if progress.timer is not None:
            sla = self.sla_class(model, cls)
            outcome = progress.timer.outcome(self.clock(), error=failed)
            if not failed and outcome.generated_tokens > 0:
                key = (model, sla.name)
                mean = self._output_tokens.get(key)
                n = float(outcome.generated_tokens)
                self._output_tokens[key] = (
                    n if mean is None else mean + OUTPUT_TOKENS_WEIGHT * (n - mean)
                )
            reason = m.record_slo(tenant, model, sla.name, self._slo_targets(sla), outcome)
            if disconnected:
                m.child(m.aborts, model, "client_disconnect").inc()
            elif failed:
                m.child(m.aborts, model, progress.abort_reason).inc()
        elif progress.rejected is not None:
            tenant, cls = progress.rejected.tenant, progress.rejected.sla_class
            reason = "shed"
            m.child(m.slo_missed, m.tenant_label(tenant), model, cls or UNKNOWN, reason).inc()
        elif disconnected:
            m.child(m.aborts, model, "client_disconnect").inc()
        m.child(m.requests, m.tenant_label(tenant), model, cls or UNKNOWN, route, status).inc()
        span = progress.span
        if span is not None:
            span.set_attributes(
                {"switchboard.status": status, "switchboard.tokens": progress.tokens}
            )
            tracing.end_span(span, f"status {status}" if failed else None)
        return reason

    def _slo_targets(self, sla: SlaClass) -> SloTargets:
        """``SloTargets.of(sla)``, made once per class object."""
        hit = self._slo.get(sla.name)
        if hit is None or hit[0] is not sla:
            hit = self._slo[sla.name] = (sla, SloTargets.of(sla))
        return hit[1]

    def _failed(self, model: str, worker: WorkerSnapshot) -> None:
        if self.breakers.record_failure(worker.worker_id, self.clock()):
            log.warning("circuit open for worker %s", worker.worker_id)
            self.metrics.child(self.metrics.circuit_opened, worker.worker_id).inc()

    # --- the stream -----------------------------------------------------------------------------

    async def stream(
        self,
        request_id: str,
        model: str,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        progress: Progress | None = None,
        *,
        sla_class: str = "",
        tenant: str = "",
    ) -> AsyncGenerator[TokenChunk, None]:
        """The request's tokens; ``sla_class`` (the admission ticket's; "" = the default) and
        ``tenant`` go into the SLA router's ``RouteRequest``."""
        progress = progress if progress is not None else Progress()
        sent: list[int] = []
        stop_ids = frozenset(sampling.stop_token_ids)
        exclude: set[str] = set()
        moves = 0
        aggregated = False
        started = self.clock()
        timer = TokenTimer(progress.arrived if progress.arrived is not None else started)
        progress.timer = timer
        sla = self.sla_class(model, sla_class)
        progress.sla_class = cls = sla.name
        itl_target = sla.itl_p95_ms
        m = self.metrics
        tenant_label = m.tenant_label(tenant)
        ttft = m.child(m.ttft, tenant_label, model, cls)
        itl = m.child(m.itl, tenant_label, model, cls)
        generated = m.child(m.generation_tokens, tenant_label, model)
        metadata = tracing.grpc_metadata(progress.span)  # None when tracing is off
        try:
            while True:
                remaining = sampling.max_tokens - len(sent)
                if remaining <= 0:
                    yield TokenChunk((), "length")
                    return
                attempt_prompt = prompt + tuple(sent)
                route_now = functools.partial(
                    self._route_or_hold,
                    model,
                    attempt_prompt,
                    remaining,
                    frozenset(exclude),
                    aggregated,
                    sla_class=sla_class,
                    tenant=tenant,
                    progress=progress,
                    request_id=request_id,
                )
                routed = route_now(hold_late=moves == 0 and self.late_policy.enabled)
                if isinstance(routed, Held):
                    held_s = await self._hold_late(
                        model, attempt_prompt, remaining, sla_class, tenant
                    )
                    routed = route_now(held_s=held_s)
                assert isinstance(routed, Route)
                route = routed
                attempt_id = request_id if moves == 0 else f"{request_id}.m{moves}"
                attempt = self._attempt(
                    attempt_id,
                    route,
                    attempt_prompt,
                    (
                        sampling
                        if remaining == sampling.max_tokens
                        else dataclasses.replace(sampling, max_tokens=remaining)
                    ),
                    model,
                    metadata,
                )
                progress.worker_ids = (*progress.worker_ids, route.decode.worker_id)
                decoding = self._decoding.setdefault(route.decode.worker_id, {})
                if itl_target is not None and sampling.max_tokens > 1:  # one token: no ITL
                    expected = self._output_tokens.get((model, cls), 0.0)
                    decoding[id(progress)] = (timer, sampling.max_tokens, itl_target, expected)
                try:
                    async for chunk in attempt:
                        ids = chunk.token_ids
                        finish = chunk.finish_reason
                        if stop_ids:
                            for i, t in enumerate(ids):
                                if t in stop_ids:
                                    ids, finish = ids[: i + 1], "stop"
                                    break
                        if not ids and finish is None:
                            continue
                        if ids:
                            now = self.clock()
                            gap = timer.tokens(len(ids), now)
                            if gap is None:
                                ttft.observe(now - timer.started)
                            else:
                                itl.observe(gap)
                            generated.inc(len(ids))
                        sent.extend(ids)
                        progress.tokens = len(sent)
                        # (immutable: passed on as it came unless cut at a stop id)
                        same = ids is chunk.token_ids and finish is chunk.finish_reason
                        yield chunk if same else TokenChunk(ids, finish)
                        if finish is not None:
                            return
                    raise WorkerFailed(
                        route.decode.worker_id, "stream ended without a finish reason"
                    )
                except WorkerFailed as e:
                    failed = next(
                        (
                            w
                            for w in (route.decode, route.prefill)
                            if w and w.worker_id == e.worker_id
                        ),
                        route.decode,
                    )
                    self._failed(model, failed)
                    moves += 1
                    if moves > self.max_migrations:
                        progress.abort_reason = "timeout" if e.timed_out else "error"
                        raise Unavailable(
                            f"request {request_id} failed after {moves - 1} moves to other "
                            f"workers; last: {e}"
                        ) from None
                    if sent:
                        progress.migrations += 1
                        self.metrics.child(self.metrics.migrations, model).inc()
                        log.warning(
                            "request %s: %s after %d tokens; migrating", request_id, e, len(sent)
                        )
                    else:
                        self.metrics.child(self.metrics.retries, model).inc()
                        log.warning("request %s: %s; retrying elsewhere", request_id, e)
                    exclude.add(e.worker_id)
                    aggregated = True
                finally:
                    decoding.pop(id(progress), None)
                    await attempt.aclose()

        except Exception:
            progress.failed = True
            raise

    async def _hold_late(
        self, model: str, prompt: tuple[int, ...], max_tokens: int, sla_class: str, tenant: str
    ) -> float:
        """Hold a late request in the late lane until the route the router would pick predicts
        it leaves room for fresh requests (``LatePolicy.may_release``), or its longest hold
        has passed (controlplane/core/routing/late.py). Returns the seconds held."""
        cls = self.sla_class(model, sla_class)
        facts = self.model_routing.get(model)
        if self.sla_router is None or facts is None or facts.timing is None:
            return 0.0
        target = cls.ttft_p95_ms
        request = RouteRequest.for_class(
            cls,
            model=model,
            prompt_tokens=len(prompt),
            max_tokens=max_tokens,
            block_size=facts.block_size,
            block_hashes=hash_blocks(prompt, facts.block_size),
            tenant=tenant,
            deployment=self.sla_router.deployment_facts(model),
        )
        sla_router, policy = self.sla_router, self.late_policy

        def may_go() -> bool:
            now = self.clock()
            workers = self.view.snapshots(model, lambda w: self.breakers.allows(w, now))
            p = sla_router.predict(request, workers)
            return p is None or policy.may_release(p, target)

        m = self.metrics
        m.child(m.late_held, model, cls.name).inc()
        waiting = m.child(m.late_waiting, model)
        waiting.inc()
        try:
            held_s = await self.late_lane.hold(model, may_go, policy.max_hold_s(target))
        finally:
            waiting.dec()
        m.child(m.late_hold, model).observe(held_s)
        return held_s

    def _attempt(
        self,
        request_id: str,
        route: Route,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        model: str,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """One route's worth of tokens; raises ``WorkerFailed`` when a worker fails it.
        ``metadata``: gRPC metadata for the workers (the trace context). The caller closes
        it (``aclose``) when done."""
        decode, prefill = route.decode, route.prefill
        sampling_pb = self._sampling_pb(sampling)
        kv_blocks = self._kv_blocks(model, len(prompt) + sampling.max_tokens)
        if prefill is not None:
            return self._disaggregated(
                request_id, decode, prefill, prompt, sampling, sampling_pb, model, metadata,
                kv_blocks,
            )  # fmt: skip
        request = worker_pb2.DecodeRequest(
            request_id=request_id, prompt_token_ids=list(prompt), sampling=sampling_pb
        )
        if (
            sampling.max_tokens == 1
            and not self._tokens_to(decode)
            and decode.endpoint not in self._no_unary
        ):
            return self._unary_else_stream(decode, request, metadata, kv_blocks)
        # aggregated and streamed: the decode stream itself (one generator less per token)
        return self._decode(decode, request, metadata, kv_blocks)

    def _kv_blocks(self, model: str, tokens: int) -> int:
        """KV blocks ``tokens`` take on the model's workers (0: block size unknown)."""
        facts = self.model_routing.get(model)
        return -(-tokens // facts.block_size) if facts is not None and facts.block_size else 0

    async def _unary_else_stream(
        self,
        decode: WorkerSnapshot,
        request: worker_pb2.DecodeRequest,
        metadata: tuple[tuple[str, str], ...] | None,
        kv_blocks: int = 0,
    ) -> AsyncGenerator[TokenChunk, None]:
        """A one-token aggregated attempt: ``DecodeUnary``, else the decode stream."""
        one = await self._decode_unary(decode, request, metadata, kv_blocks)
        if one is not None:
            yield one
            return
        # closed here, not by the event loop's finalizer a turn later (a task per request;
        # the worker's in-flight count would lag)
        async with contextlib.aclosing(
            self._decode(decode, request, metadata, kv_blocks)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _disaggregated(
        self,
        request_id: str,
        decode: WorkerSnapshot,
        prefill: WorkerSnapshot,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        sampling_pb: inference_pb2.SamplingParams,
        model: str,
        metadata: tuple[tuple[str, str], ...] | None,
        kv_blocks: int = 0,
    ) -> AsyncGenerator[TokenChunk, None]:
        """A disaggregated attempt: ``Prefill`` (its token goes out at once), then ``Decode``
        with the KV handle; NOT_FOUND before the decode's first token prefills once more.
        ``kv_blocks``: what the request may hold on the decode worker."""
        prompt_blocks = self._kv_blocks(model, len(prompt))
        res = await self._prefill(prefill, request_id, prompt, sampling_pb, metadata, prompt_blocks)
        first = res.first_token_id
        handed = False
        try:
            one_token = sampling.max_tokens == 1
            stops = first in sampling.stop_token_ids
            yield TokenChunk((first,), "length" if one_token else ("stop" if stops else None))
            if one_token or stops:
                return
            for again in (False, True):
                request = worker_pb2.DecodeRequest(
                    request_id=request_id,
                    prompt_token_ids=list(prompt),
                    kv=res.kv,
                    first_token_id=first,
                    sampling=sampling_pb,
                )
                stream = self._decode(decode, request, metadata, kv_blocks)
                try:
                    try:
                        head = await anext(stream)
                    except KvUnavailable as e:
                        if again:
                            raise
                        log.info("request %s: %s; prefilling again", request_id, e)
                        self.metrics.child(self.metrics.reprefills, model).inc()
                        res = await self._prefill(
                            prefill, request_id, prompt, sampling_pb, metadata, prompt_blocks
                        )
                        continue
                    except StopAsyncIteration:
                        return
                    handed = True
                    # the decode worker's stream starts after the prefill's token
                    yield head
                    async for chunk in stream:
                        yield chunk
                    return
                finally:
                    await stream.aclose()
        finally:
            if not handed:  # the prefilled KV is still held: free it
                self._abort_later(prefill, request_id)

    async def _prefill(
        self,
        worker: WorkerSnapshot,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: inference_pb2.SamplingParams,
        metadata: tuple[tuple[str, str], ...] | None = None,
        kv_blocks: int = 0,
    ) -> worker_pb2.PrefillResponse:
        self.breakers.acquire(worker.worker_id, self.clock())
        request = worker_pb2.PrefillRequest(
            request_id=request_id, prompt_token_ids=list(prompt), sampling=sampling
        )
        with self.view.in_flight(worker.worker_id, len(prompt), kv_blocks):
            try:
                if self._tokens_to(worker):
                    res = await self.view.channels.tokens.prefill(
                        worker.token_endpoint,
                        request,
                        deadline_s=self.prefill_timeout_s,
                        metadata=metadata,
                    )
                else:
                    res = await self.view.channels.stub(worker.endpoint).Prefill(
                        request, timeout=self.prefill_timeout_s, metadata=metadata
                    )
            except asyncio.CancelledError:
                self._abort_later(worker, request_id)
                raise
            except (grpc.aio.AioRpcError, TokenRpcError) as e:
                raise _translate(e, worker.worker_id) from None
        self.breakers.record_success(worker.worker_id)
        return res

    async def _decode(
        self,
        worker: WorkerSnapshot,
        request: worker_pb2.DecodeRequest,
        metadata: tuple[tuple[str, str], ...] | None = None,
        kv_blocks: int = 0,
    ) -> AsyncGenerator[TokenChunk, None]:
        self.breakers.acquire(worker.worker_id, self.clock())
        finished = False
        succeeded = False
        # no KV handed over: the decode worker prefills the prompt itself first
        local_prefill = 0 if request.HasField("kv") else len(request.prompt_token_ids)
        with self.view.in_flight(worker.worker_id, local_prefill, kv_blocks) as pending:
            call: _DecodeCall = (
                self.view.channels.tokens.decode(
                    worker.token_endpoint,
                    request,
                    deadline_s=self.decode_timeout_s,
                    metadata=metadata,
                )
                if self._tokens_to(worker)
                else self.view.channels.stub(worker.endpoint).Decode(
                    request, timeout=self.decode_timeout_s, metadata=metadata
                )
            )
            try:
                async for msg in call:
                    if not succeeded:
                        succeeded = True
                        pending.done()
                        self.breakers.record_success(worker.worker_id)
                    finished = bool(msg.finish_reason)
                    yield TokenChunk(tuple(msg.token_ids), msg.finish_reason or None)
                    if finished:
                        return
            except (grpc.aio.AioRpcError, TokenRpcError) as e:
                finished = True  # the worker's side is over already
                raise _translate(e, worker.worker_id) from None
            finally:
                if not isinstance(call, grpc.aio.UnaryStreamCall):
                    # closing an unfinished token stream sends CANCEL: the worker cancels the
                    # request, which aborts it on the engine and frees its KV
                    await call.aclose()
                elif not finished:  # the consumer stopped early: free the worker's KV
                    call.cancel()
                    self._abort_later(worker, request.request_id)

    async def _decode_unary(
        self,
        worker: WorkerSnapshot,
        request: worker_pb2.DecodeRequest,
        metadata: tuple[tuple[str, str], ...] | None = None,
        kv_blocks: int = 0,
    ) -> TokenChunk | None:
        """A one-token decode as one unary ``DecodeUnary`` call (about half the gateway CPU of
        a ``Decode`` stream); None when the worker does not have it (UNIMPLEMENTED: an older
        worker; ``_no_unary`` remembers its endpoint and the caller streams instead)."""
        stub = self.view.channels.stub(worker.endpoint)
        self.breakers.acquire(worker.worker_id, self.clock())
        local_prefill = 0 if request.HasField("kv") else len(request.prompt_token_ids)
        with self.view.in_flight(worker.worker_id, local_prefill, kv_blocks):
            try:
                msg = await stub.DecodeUnary(
                    request, timeout=self.decode_timeout_s, metadata=metadata
                )
            except asyncio.CancelledError:
                self._abort_later(worker, request.request_id)
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._no_unary.add(worker.endpoint)
                    return None
                raise _translate(e, worker.worker_id) from None
        self.breakers.record_success(worker.worker_id)
        if not msg.finish_reason:
            raise WorkerFailed(worker.worker_id, "DecodeUnary answered without a finish reason")
        return TokenChunk(tuple(msg.token_ids), msg.finish_reason)

    def _sampling_pb(self, s: SamplingParams) -> inference_pb2.SamplingParams:
        """The Worker API's sampling message for ``s`` (the same few settings come again and
        again: built once each; the message is only ever copied into requests)."""
        key = (s.max_tokens, s.temperature, s.top_p, s.seed)
        msg = self._sampling_msgs.get(key)
        if msg is None:
            if len(self._sampling_msgs) >= 4096:
                self._sampling_msgs.clear()
            msg = self._sampling_msgs[key] = _sampling_pb(s)
        return msg

    def _tokens_to(self, worker: WorkerSnapshot) -> bool:
        """Whether calls to ``worker`` go over its token transport (else its gRPC service)."""
        return self.token_transport and bool(worker.token_endpoint)

    def _abort_later(self, worker: WorkerSnapshot, request_id: str) -> None:
        """Send Abort without waiting (also from a cancelled task)."""

        async def abort() -> None:
            stub = self.view.channels.stub(worker.endpoint)
            with contextlib.suppress(grpc.aio.AioRpcError, SwitchboardError):
                await stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=5.0)

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Send the requests still held in the late lane; wait (briefly) for background
        aborts."""
        await self.late_lane.close()
        if self._background:
            await asyncio.wait(set(self._background), timeout=5.0)


def _sampling_pb(s: SamplingParams) -> inference_pb2.SamplingParams:
    msg = inference_pb2.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature)
    msg.top_p = s.top_p
    if s.seed is not None:
        msg.seed = s.seed
    return msg
