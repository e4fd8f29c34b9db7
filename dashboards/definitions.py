"""Switchboard's four Grafana dashboards: SLA overview, Fleet, Router and Control plane.

Every query reads metrics defined in ``controlplane/telemetry/metrics.py`` or series recorded by
``dashboards/rules.py`` (a unit test checks both). ``$tenant``, ``$model`` and ``$class`` are
multi-select template variables ("All" is ``.*``); ``$__rate_interval`` is Grafana's.
"""

from __future__ import annotations

from dashboards.grafana import Dashboard, Panel, QueryVariable, Row, Target, Threshold
from dashboards.slo import FAST_BURN, SLO_PERIOD, SLOW_BURN

TMC = 'tenant=~"$tenant", model=~"$model", sla_class=~"$class"'
"""Filter of the series labelled by tenant, model and class."""
TM = 'tenant=~"$tenant", model=~"$model"'
MC = 'model=~"$model", sla_class=~"$class"'
M = 'model=~"$model"'
RI = "$__rate_interval"

VARIABLES = (
    QueryVariable("tenant", "Tenant", "label_values(switchboard_requests_total, tenant)"),
    QueryVariable("model", "Model", "label_values(switchboard_requests_total, model)"),
    QueryVariable("class", "SLA class", "label_values(switchboard_requests_total, sla_class)"),
)

_RED_GREEN = (Threshold(None, "red"), Threshold(0.95, "orange"), Threshold(0.99, "green"))


def _quantiles(metric: str, by: str, filt: str, recorded: bool) -> tuple[Target, ...]:
    sel = f"{{{filt}}}" if filt else ""
    if recorded:
        inner = f"sum by (le, {by}) (switchboard:{metric}_bucket:rate5m{sel})"
    else:
        inner = f"sum by (le, {by}) (rate(switchboard_{metric}_bucket{sel}[{RI}]))"
    return tuple(
        Target(f"histogram_quantile({q}, {inner})", f"p{round(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.95, 0.99)
    )


def _ratio(num: str, den: str, by: str) -> str:
    return f"sum by ({by}) ({num})\n/\nsum by ({by}) ({den})"


def _share(selector: str, total: str, by: str) -> str:
    """Rate of ``selector`` over rate of ``total``, 0 (not no data) when ``selector`` is unseen."""
    part = f"sum by ({by}) (rate({selector}[{RI}]))"
    whole = f"sum by ({by}) (rate({total}[{RI}]))"
    return f"(\n  {part}\n  or\n  0 * {whole}\n)\n/\n{whole}"


def _burn(window: str) -> str:
    return (
        f"(\n{_ratio(f'switchboard:slo_missed:rate{window}{{{TMC}}}', f'switchboard:slo_requests:rate{window}{{{TMC}}}', 'tenant, sla_class')}\n)\n"  # noqa: E501
        "/ on (sla_class) group_left\n"
        'switchboard:slo_error_budget:ratio{sla_class=~"$class"}'
    )


def sla_overview() -> Dashboard:
    attainment = f"1 - (\n{_ratio(f'switchboard:slo_missed:rate5m{{{TMC}}}', f'switchboard:slo_requests:rate5m{{{TMC}}}', 'tenant, sla_class')}\n)"  # noqa: E501
    attainment_1h = attainment.replace("rate5m", "rate1h")
    # The period's error ratio is a ratio already; across models take the worst one.
    budget = (
        f"1 - (\n  max by (tenant, sla_class) (switchboard:slo_error_ratio:rate{SLO_PERIOD}"
        f"{{{TMC}}})\n)\n/ on (sla_class) group_left\n"
        'switchboard:slo_error_budget:ratio{sla_class=~"$class"}'
    )
    objective = Target(
        'max by (sla_class) (switchboard:slo_objective:ratio{sla_class=~"$class"})',
        "objective {{sla_class}}",
    )
    return Dashboard(
        uid="switchboard-sla",
        title="Switchboard / SLA overview",
        description=(
            "What tenants were promised and what they got: SLO attainment per tenant and class"
            " against its objective, error budget, burn rate, goodput and latency quantiles."
        ),
        variables=VARIABLES,
        rows=(
            Row(
                "SLO attainment",
                (
                    Panel(
                        "SLO attainment vs objective (5m)",
                        "timeseries",
                        (Target(attainment, "{{tenant}} / {{sla_class}}"), objective),
                        description=(
                            "Fraction of requests that met their class's TTFT and ITL targets"
                            " (and completed), per tenant and class; dashed: the objective."
                        ),
                        unit="percentunit",
                        max=1,
                        width=16,
                        thresholds=_RED_GREEN,
                    ),
                    Panel(
                        "SLO attainment, last hour",
                        "bargauge",
                        (Target(attainment_1h, "{{tenant}} / {{sla_class}}", instant=True),),
                        unit="percentunit",
                        min=0,
                        max=1,
                        width=8,
                        thresholds=_RED_GREEN,
                    ),
                ),
            ),
            Row(
                "Error budget",
                (
                    Panel(
                        f"Error budget remaining ({SLO_PERIOD})",
                        "bargauge",
                        (Target(budget, "{{tenant}} / {{sla_class}}", instant=True),),
                        description=(
                            f"1 - (error ratio over {SLO_PERIOD}) / (1 - objective); below 0"
                            " the budget is spent. Worst model per tenant and class."
                        ),
                        unit="percentunit",
                        max=1,
                        width=8,
                        thresholds=(
                            Threshold(None, "red"),
                            Threshold(0.25, "orange"),
                            Threshold(0.5, "green"),
                        ),
                    ),
                    Panel(
                        "Burn rate",
                        "timeseries",
                        (
                            Target(_burn(FAST_BURN.long_window), "1h {{tenant}} / {{sla_class}}"),
                            Target(_burn(SLOW_BURN.long_window), "6h {{tenant}} / {{sla_class}}"),
                        ),
                        description=(
                            "How many times faster than sustainable the budget burns (1 = it"
                            f" lasts exactly {SLO_PERIOD}). Pages at {FAST_BURN.factor:g}x over"
                            f" 1h and {SLOW_BURN.factor:g}x over 6h (with their short windows)."
                        ),
                        unit="x",
                        min=0,
                        width=16,
                        thresholds=(
                            Threshold(None, "green"),
                            Threshold(SLOW_BURN.factor, "orange"),
                            Threshold(FAST_BURN.factor, "red"),
                        ),
                    ),
                ),
            ),
            Row(
                "Goodput and traffic",
                (
                    Panel(
                        "Goodput (tokens/s of requests that met their SLO)",
                        "timeseries",
                        (
                            Target(
                                "sum by (tenant, sla_class)"
                                f" (switchboard:goodput_tokens:rate5m{{{TMC}}})",
                                "goodput {{tenant}} / {{sla_class}}",
                            ),
                            Target(
                                f"sum by (tenant) (switchboard:generation_tokens:rate5m{{{TM}}})",
                                "all tokens {{tenant}}",
                            ),
                            Target(
                                "sum by (tenant)"
                                f" (rate(switchboard_prompt_tokens_total{{{TM}}}[{RI}]))",
                                "prompt tokens {{tenant}}",
                            ),
                        ),
                        unit="short",
                        width=12,
                    ),
                    Panel(
                        "Requests by status",
                        "timeseries",
                        (
                            Target(
                                "sum by (status)"
                                f" (rate(switchboard_requests_total{{{TMC}}}[{RI}]))",
                                "{{status}}",
                            ),
                        ),
                        unit="reqps",
                        width=6,
                        stacked=True,
                    ),
                    Panel(
                        "SLO misses by reason",
                        "timeseries",
                        (
                            Target(
                                "sum by (sla_class, reason)"
                                f" (rate(switchboard_slo_missed_total{{{TMC}}}[{RI}]))",
                                "{{sla_class}}: {{reason}}",
                            ),
                        ),
                        unit="reqps",
                        width=6,
                        stacked=True,
                    ),
                ),
            ),
            Row(
                "Latency",
                (
                    Panel(
                        "Time to first token",
                        "timeseries",
                        _quantiles("ttft_seconds", "sla_class", TMC, recorded=True),
                        description="p50 / p95 / p99 per class (targets: interactive 0.5 s,"
                        " standard 2 s).",
                        unit="s",
                        width=12,
                    ),
                    Panel(
                        "Inter-token latency",
                        "timeseries",
                        _quantiles("itl_seconds", "sla_class", TMC, recorded=True),
                        description="p50 / p95 / p99 per class, per gap between tokens"
                        " (targets: interactive 50 ms, standard 100 ms).",
                        unit="s",
                        width=12,
                    ),
                    Panel(
                        "Time per output token (per request)",
                        "timeseries",
                        _quantiles("tpot_seconds", "sla_class", TMC, recorded=True),
                        description="p50 / p95 / p99 per class of each request's mean gap"
                        " (TPOT): what the SLO's ITL target is judged on, and what the planner"
                        " sizes decode pools by.",
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "End-to-end latency p95",
                        "timeseries",
                        (
                            Target(
                                "histogram_quantile(0.95, sum by (le, sla_class)"
                                f" (rate(switchboard_e2e_latency_seconds_bucket{{{TMC}}}[{RI}])))",
                                "p95 {{sla_class}}",
                            ),
                        ),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Admission queue wait p95",
                        "timeseries",
                        (
                            Target(
                                "histogram_quantile(0.95, sum by (le, sla_class)"
                                f" (rate(switchboard_queue_wait_seconds_bucket{{{TMC}}}[{RI}])))",
                                "p95 {{sla_class}}",
                            ),
                        ),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Admission: queued and rejected (429 / 503)",
                        "timeseries",
                        (
                            Target(
                                "sum by (tenant, reason)"
                                f" (rate(switchboard_admission_rejected_total{{{TMC}}}[{RI}]))",
                                "rejected {{tenant}}: {{reason}}",
                            ),
                            Target(
                                "sum by (tenant)"
                                f" (rate(switchboard_admission_queued_total{{{TMC}}}[{RI}]))",
                                "queued {{tenant}}",
                            ),
                        ),
                        unit="reqps",
                        width=8,
                    ),
                    Panel(
                        "Quota parts per gateway replica",
                        "timeseries",
                        (
                            Target(
                                f"switchboard_quota_share{{{TM}}}",
                                "{{instance}} {{tenant}}: {{quota}}",
                            ),
                        ),
                        description="Each gateway replica's part of a tenant's quota, shared by"
                        " what the replica's clients ask (a replica alone has the whole quota);"
                        " the parts of the replicas a tenant uses add up to about its quota.",
                        width=16,
                    ),
                ),
            ),
        ),
    )


def fleet() -> Dashboard:
    return Dashboard(
        uid="switchboard-fleet",
        title="Switchboard / Fleet",
        description=(
            "Nodes, GPUs and workers by state, per-worker KV cache use and load, admission"
            " queues, KV transfers and node health."
        ),
        variables=VARIABLES,
        rows=(
            Row(
                "Capacity",
                (
                    Panel(
                        "Nodes by state",
                        "stat",
                        (Target("sum by (state) (switchboard_nodes)", "{{state}}"),),
                        width=6,
                    ),
                    Panel(
                        "GPUs by state",
                        "stat",
                        (Target("sum by (state) (switchboard_gpus)", "{{state}}"),),
                        width=6,
                    ),
                    Panel(
                        "Workers by role and state",
                        "table",
                        (
                            Target(
                                f"sum by (model, role, state) (switchboard_workers{{{M}}})",
                                "",
                            ),
                        ),
                        width=12,
                    ),
                ),
            ),
            Row(
                "Workers",
                (
                    Panel(
                        "KV cache usage per worker",
                        "timeseries",
                        (
                            Target(
                                "max by (worker, role)"
                                f" (switchboard_worker_kv_cache_usage_ratio{{{M}}})",
                                "{{worker}} ({{role}})",
                            ),
                        ),
                        unit="percentunit",
                        min=0,
                        max=1,
                        width=12,
                        thresholds=(
                            Threshold(None, "green"),
                            Threshold(0.8, "orange"),
                            Threshold(0.95, "red"),
                        ),
                    ),
                    Panel(
                        "Running and waiting requests per worker",
                        "timeseries",
                        (
                            Target(
                                "sum by (worker, role)"
                                f" (switchboard_worker_running_requests{{{M}}})",
                                "running {{worker}} ({{role}})",
                            ),
                            Target(
                                "sum by (worker, role)"
                                f" (switchboard_worker_waiting_requests{{{M}}})",
                                "waiting {{worker}} ({{role}})",
                            ),
                        ),
                        width=12,
                    ),
                    Panel(
                        "Worker tokens/s by kind",
                        "timeseries",
                        (
                            Target(
                                "sum by (role, kind)"
                                f" (rate(switchboard_worker_tokens_total{{{M}}}[{RI}]))",
                                "{{kind}} on {{role}}",
                            ),
                        ),
                        width=12,
                    ),
                    Panel(
                        "Engine prefix-cache hit ratio per worker",
                        "timeseries",
                        (
                            Target(
                                "max by (worker, role)"
                                f" (switchboard_worker_prefix_cache_hit_ratio{{{M}}})",
                                "{{worker}} ({{role}})",
                            ),
                        ),
                        unit="percentunit",
                        min=0,
                        max=1,
                        width=12,
                    ),
                ),
            ),
            Row(
                "Queues",
                (
                    Panel(
                        "Admission queue depth",
                        "timeseries",
                        (
                            Target(
                                f"sum by (model, sla_class) (switchboard_queue_depth{{{MC}}})",
                                "{{model}} / {{sla_class}}",
                            ),
                        ),
                        width=12,
                    ),
                    Panel(
                        "In-flight requests",
                        "timeseries",
                        (
                            Target(
                                f"sum by (model) (switchboard_in_flight_requests{{{M}}})",
                                "{{model}}",
                            ),
                        ),
                        width=12,
                    ),
                ),
            ),
            Row(
                "KV transfers",
                (
                    Panel(
                        "KV transfer throughput",
                        "timeseries",
                        (
                            Target(
                                "sum by (direction)"
                                f" (rate(switchboard_kv_transfer_bytes_total{{{M}}}[{RI}]))",
                                "{{direction}}",
                            ),
                        ),
                        unit="Bps",
                        width=8,
                    ),
                    Panel(
                        "KV transfer latency",
                        "timeseries",
                        _quantiles("kv_transfer_seconds", "model", M, recorded=False),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "KV transfer failures by reason",
                        "timeseries",
                        (
                            Target(
                                "sum by (model, reason)"
                                f" (rate(switchboard_kv_transfer_failures_total{{{M}}}[{RI}]))",
                                "{{model}}: {{reason}}",
                            ),
                        ),
                        unit="ops",
                        width=8,
                    ),
                ),
            ),
            Row(
                "Node health",
                (
                    Panel(
                        "GPUs per node by state (node agents)",
                        "table",
                        (Target("sum by (node, state) (switchboard_node_gpus)", ""),),
                        width=12,
                    ),
                    Panel(
                        "Scrape targets up",
                        "timeseries",
                        (Target('sum by (job) (up{job=~"switchboard.*"})', "{{job}}"),),
                        description="Components Prometheus can scrape, per job.",
                        width=6,
                    ),
                    Panel(
                        "Node-agent heartbeat failures",
                        "timeseries",
                        (
                            Target(
                                "sum by (instance)"
                                f" (increase(switchboard_node_heartbeat_failures_total[{RI}]))",
                                "{{instance}}",
                            ),
                        ),
                        width=6,
                    ),
                ),
            ),
        ),
    )


def router() -> Dashboard:
    decisions = f"switchboard_router_decisions_total{{{M}}}"
    return Dashboard(
        uid="switchboard-router",
        title="Switchboard / Router",
        description=(
            "How the gateway's router decides: decision latency and per-plugin time, the"
            " deciding plugins, prefix-cache hits, prefill/decode disaggregation, migrations."
        ),
        variables=VARIABLES,
        rows=(
            Row(
                "Decisions",
                (
                    Panel(
                        "Decision latency",
                        "timeseries",
                        _quantiles("router_decision_seconds", "policy", M, recorded=False),
                        unit="s",
                        width=12,
                    ),
                    Panel(
                        "Time per plugin (p99)",
                        "timeseries",
                        (
                            Target(
                                "histogram_quantile(0.99, sum by (le, plugin)"
                                f" (rate(switchboard_router_plugin_seconds_bucket[{RI}])))",
                                "{{plugin}}",
                            ),
                        ),
                        unit="s",
                        width=12,
                    ),
                    Panel(
                        "Routing reasons (deciding plugin)",
                        "timeseries",
                        (
                            Target(
                                "sum by (plugin)"
                                f" (rate(switchboard_router_reasons_total{{{M}}}[{RI}]))",
                                "{{plugin}}",
                            ),
                        ),
                        unit="ops",
                        width=12,
                        stacked=True,
                    ),
                    Panel(
                        "Decisions by policy and prefill",
                        "timeseries",
                        (
                            Target(
                                f"sum by (policy, prefill) (rate({decisions}[{RI}]))",
                                "{{policy}} / prefill {{prefill}}",
                            ),
                        ),
                        unit="ops",
                        width=12,
                        stacked=True,
                    ),
                ),
            ),
            Row(
                "Cache and disaggregation",
                (
                    Panel(
                        "Prefix-cache hit rate (router view)",
                        "timeseries",
                        (
                            Target(
                                _share(
                                    f"switchboard_prefix_cache_hit_tokens_total{{{M}}}",
                                    f"switchboard_prefix_cache_query_tokens_total{{{M}}}",
                                    "model",
                                ),
                                "{{model}}",
                            ),
                        ),
                        description="Prompt tokens the chosen worker already held / prompt"
                        " tokens looked up.",
                        unit="percentunit",
                        min=0,
                        max=1,
                        width=12,
                    ),
                    Panel(
                        "Remote prefill share (disaggregated decisions)",
                        "timeseries",
                        (
                            Target(
                                _share(
                                    f'switchboard_router_decisions_total{{{M}, prefill="remote"}}',
                                    decisions,
                                    "model",
                                ),
                                "{{model}}",
                            ),
                            Target(
                                _share(
                                    f"switchboard_long_context_lent_total{{{M}}}",
                                    decisions,
                                    "model",
                                ),
                                "{{model}} lent to long_context",
                            ),
                        ),
                        unit="percentunit",
                        min=0,
                        max=1,
                        width=12,
                    ),
                ),
            ),
            Row(
                "Late lane (requests held while others can still meet their TTFT target)",
                (
                    Panel(
                        "Requests held, by class",
                        "timeseries",
                        (
                            Target(
                                "sum by (sla_class)"
                                f" (rate(switchboard_late_held_total{{{M}}}[{RI}]))",
                                "{{sla_class}}",
                            ),
                        ),
                        description="Requests the router predicted late at arrival (their TTFT"
                        " target missed on every route) and held back so that requests that"
                        " could still make theirs went first. Sustained: the fleet is short of"
                        " prefill capacity for the offered load.",
                        unit="ops",
                        width=8,
                    ),
                    Panel(
                        "Held now",
                        "timeseries",
                        (
                            Target(
                                f"sum by (model) (switchboard_late_lane_requests{{{M}}})",
                                "{{model}}",
                            ),
                        ),
                        unit="short",
                        min=0,
                        width=8,
                    ),
                    Panel(
                        "Hold time p95",
                        "timeseries",
                        (
                            Target(
                                "histogram_quantile(0.95, sum by (le, model)"
                                f" (rate(switchboard_late_hold_seconds_bucket{{{M}}}[{RI}])))",
                                "{{model}}",
                            ),
                        ),
                        unit="s",
                        min=0,
                        width=8,
                    ),
                ),
            ),
            Row(
                "Failures on the request path",
                (
                    Panel(
                        "Migrations, retries and re-prefills",
                        "timeseries",
                        (
                            Target(
                                f"sum by (model) (rate(switchboard_migrations_total{{{M}}}[{RI}]))",
                                "migrations {{model}}",
                            ),
                            Target(
                                f"sum by (model) (rate(switchboard_retries_total{{{M}}}[{RI}]))",
                                "retries {{model}}",
                            ),
                            Target(
                                "sum by (model)"
                                f" (rate(switchboard_kv_reprefills_total{{{M}}}[{RI}]))",
                                "re-prefills {{model}}",
                            ),
                        ),
                        unit="ops",
                        width=8,
                    ),
                    Panel(
                        "Aborts by reason",
                        "timeseries",
                        (
                            Target(
                                f"sum by (reason) (rate(switchboard_aborts_total{{{M}}}[{RI}]))",
                                "{{reason}}",
                            ),
                        ),
                        unit="ops",
                        width=8,
                    ),
                    Panel(
                        "Circuit breakers opened",
                        "timeseries",
                        (
                            Target(
                                f"sum by (worker) (increase(switchboard_circuit_open_total[{RI}]))",
                                "{{worker}}",
                            ),
                        ),
                        width=8,
                    ),
                ),
            ),
        ),
    )


def control_plane() -> Dashboard:
    return Dashboard(
        uid="switchboard-controlplane",
        title="Switchboard / Control plane",
        description=(
            "Leader election, the reconciler's actions and duration, placement failures,"
            " worker restarts and etcd latency."
        ),
        variables=VARIABLES,
        rows=(
            Row(
                "Leadership",
                (
                    Panel(
                        "Leader per replica",
                        "stat",
                        (Target("max by (replica) (switchboard_leader)", "{{replica}}"),),
                        description="1: this replica leads. Exactly one should.",
                        width=12,
                        thresholds=(Threshold(None, "text"), Threshold(1, "green")),
                    ),
                    Panel(
                        "Replicas leading (should be 1)",
                        "stat",
                        (Target("sum(switchboard_leader)", "leaders"),),
                        width=6,
                        thresholds=(
                            Threshold(None, "red"),
                            Threshold(1, "green"),
                            Threshold(2, "red"),
                        ),
                    ),
                    Panel(
                        "Leader changes (1h)",
                        "stat",
                        (Target("sum(increase(switchboard_leader_changes_total[1h]))", "changes"),),
                        width=6,
                    ),
                ),
            ),
            Row(
                "Reconciler",
                (
                    Panel(
                        "Reconcile actions by action and result",
                        "timeseries",
                        (
                            Target(
                                "sum by (action, result)"
                                f" (rate(switchboard_reconcile_actions_total[{RI}]))",
                                "{{action}} {{result}}",
                            ),
                        ),
                        unit="ops",
                        width=12,
                        stacked=True,
                    ),
                    Panel(
                        "Reconcile pass duration",
                        "timeseries",
                        (
                            Target(
                                "histogram_quantile(0.99, sum by (le)"
                                f" (rate(switchboard_reconcile_duration_seconds_bucket[{RI}])))",
                                "p99",
                            ),
                            Target(
                                f"sum(rate(switchboard_reconcile_duration_seconds_count[{RI}]))",
                                "passes/s",
                            ),
                        ),
                        unit="s",
                        width=12,
                    ),
                    Panel(
                        "Placement failures by reason",
                        "timeseries",
                        (
                            Target(
                                "sum by (deployment, reason)"
                                f" (increase(switchboard_placement_failures_total[{RI}]))",
                                "{{deployment}}: {{reason}}",
                            ),
                        ),
                        width=12,
                    ),
                    Panel(
                        "Worker restarts (replaced after dying)",
                        "timeseries",
                        (
                            Target(
                                "sum by (deployment, pool)"
                                f" (increase(switchboard_worker_restarts_total[{RI}]))",
                                "{{deployment}}/{{pool}}",
                            ),
                        ),
                        width=12,
                    ),
                    Panel(
                        "Workers by model, role and state",
                        "timeseries",
                        (
                            Target(
                                f"sum by (model, role, state) (switchboard_workers{{{M}}})",
                                "{{model}} {{role}} {{state}}",
                            ),
                        ),
                        width=24,
                        height=7,
                    ),
                ),
            ),
            Row(
                "etcd",
                (
                    Panel(
                        "etcd request latency",
                        "timeseries",
                        _quantiles("etcd_request_seconds", "op", "", recorded=False),
                        unit="s",
                        width=16,
                    ),
                    Panel(
                        "etcd requests/s by op",
                        "timeseries",
                        (
                            Target(
                                f"sum by (op) (rate(switchboard_etcd_request_seconds_count[{RI}]))",
                                "{{op}}",
                            ),
                        ),
                        unit="ops",
                        width=8,
                    ),
                ),
            ),
        ),
    )


def all_dashboards() -> tuple[Dashboard, ...]:
    return (sla_overview(), fleet(), router(), control_plane())
