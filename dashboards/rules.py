"""Prometheus recording and alert rules, as code (rendered to ``deploy/prometheus/rules/``).

Recording rules (``switchboard:<what>:<how><window>``, the usual level:metric:operation form):

* ``switchboard:slo_missed:rate<W>`` / ``switchboard:slo_requests:rate<W>`` /
  ``switchboard:slo_error_ratio:rate<W>`` by tenant, model and class for each window of
  ``slo.RATE_WINDOWS``. A series exists as soon as either the met or the missed counter does
  (``or 0 * ...``), so a class that never missed has an error ratio of 0, not no data;
* ``switchboard:slo_error_ratio:rate30d``: the SLO period's error ratio (from the 5m rates, which
  is cheap to keep over 30 days);
* ``switchboard:slo_objective:ratio{sla_class}`` and ``switchboard:slo_error_budget:ratio``
  (``1 - objective``): each class's objective and budget, for dashboards;
* goodput and the TTFT / ITL bucket rates the dashboards' quantiles read.

Alerts: the two burn-rate alerts per SLA class (``slo.py``), and the platform's own: no leader,
nodes lost, workers crash-looping, KV transfer failures. Each carries a ``runbook_url`` to its
section of ``docs/runbook.md``. ``AlertRule.signals`` are the queries of the data each alert
reads, without its threshold: the monitoring test checks they return data from a real stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dashboards.slo import BURN_RATE_ALERTS, OBJECTIVES, RATE_WINDOWS, SLO_LABELS, SLO_PERIOD

RUNBOOK = "docs/runbook.md"
"""Alerts link to ``<RUNBOOK>#<anchor>`` (a path in this repository)."""

BY_SLO = ", ".join(SLO_LABELS)


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str
    labels: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"record": self.record, "expr": self.expr}
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


@dataclass(frozen=True)
class AlertRule:
    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    runbook_anchor: str
    labels: tuple[tuple[str, str], ...] = ()
    signals: tuple[str, ...] = field(default=())
    """Queries of the data the alert reads (no threshold): they return data on a live stack."""

    @property
    def runbook_url(self) -> str:
        return f"{RUNBOOK}#{self.runbook_anchor}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, **dict(self.labels)},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": self.runbook_url,
            },
        }


@dataclass(frozen=True)
class RuleGroup:
    name: str
    rules: tuple[RecordingRule | AlertRule, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rules": [r.to_dict() for r in self.rules]}


def _complete(first: str, second: str) -> str:
    """``first``, plus a 0 for every label set only ``second`` has."""
    return f"(\n  {first}\n  or\n  0 * {second}\n)"


def slo_recording_rules() -> RuleGroup:
    rules: list[RecordingRule] = []
    for w in RATE_WINDOWS:
        met = f"sum by ({BY_SLO}) (rate(switchboard_slo_met_total[{w}]))"
        missed = f"sum by ({BY_SLO}) (rate(switchboard_slo_missed_total[{w}]))"
        rules += [
            RecordingRule(f"switchboard:slo_missed:rate{w}", _complete(missed, met)),
            RecordingRule(
                f"switchboard:slo_requests:rate{w}",
                f"{_complete(met, missed)}\n+\nswitchboard:slo_missed:rate{w}",
            ),
            RecordingRule(
                f"switchboard:slo_error_ratio:rate{w}",
                f"switchboard:slo_missed:rate{w}\n/\nswitchboard:slo_requests:rate{w}",
            ),
        ]
    rules.append(
        RecordingRule(
            f"switchboard:slo_error_ratio:rate{SLO_PERIOD}",
            f"sum by ({BY_SLO}) (sum_over_time(switchboard:slo_missed:rate5m[{SLO_PERIOD}]))\n/\n"
            f"sum by ({BY_SLO}) (sum_over_time(switchboard:slo_requests:rate5m[{SLO_PERIOD}]))",
        )
    )
    for name, objective in OBJECTIVES.items():
        rules.append(
            RecordingRule(
                "switchboard:slo_objective:ratio", f"vector({objective:g})", (("sla_class", name),)
            )
        )
    for name, objective in OBJECTIVES.items():
        rules.append(
            RecordingRule(
                "switchboard:slo_error_budget:ratio",
                f"vector({1 - objective:.6g})",
                (("sla_class", name),),
            )
        )
    return RuleGroup("switchboard-slo", tuple(rules))


def latency_recording_rules() -> RuleGroup:
    rules = [
        RecordingRule(
            "switchboard:goodput_tokens:rate5m",
            f"sum by ({BY_SLO}) (rate(switchboard_goodput_tokens_total[5m]))",
        ),
        RecordingRule(
            "switchboard:generation_tokens:rate5m",
            "sum by (tenant, model) (rate(switchboard_generation_tokens_total[5m]))",
        ),
    ]
    for metric in ("ttft_seconds", "itl_seconds", "tpot_seconds"):
        rules.append(
            RecordingRule(
                f"switchboard:{metric}_bucket:rate5m",
                f"sum by ({BY_SLO}, le) (rate(switchboard_{metric}_bucket[5m]))",
            )
        )
    return RuleGroup("switchboard-latency", tuple(rules))


def slo_alert_rules() -> RuleGroup:
    rules: list[AlertRule] = []
    for a in BURN_RATE_ALERTS:
        for cls, objective in OBJECTIVES.items():
            t = a.threshold(objective)
            long_ = f'switchboard:slo_error_ratio:rate{a.long_window}{{sla_class="{cls}"}}'
            short = f'switchboard:slo_error_ratio:rate{a.short_window}{{sla_class="{cls}"}}'
            speed = "fast" if a.factor > 10 else "slow"
            rules.append(
                AlertRule(
                    alert=a.name,
                    expr=f"{long_} > {t}\nand on ({BY_SLO})\n{short} > {t}",
                    for_=a.for_,
                    severity=a.severity,
                    labels=(("sla_class", cls), ("slo_window", speed)),
                    summary=(
                        "{{ $labels.tenant }} is burning its {{ $labels.sla_class }} SLO budget"
                        f" on {{{{ $labels.model }}}} {a.factor:g}x too fast"
                    ),
                    description=(
                        f"{{{{ $value | humanizePercentage }}}} of {cls} requests missed their"
                        f" SLO over the last {a.long_window} (and still over {a.short_window});"
                        f" the objective is {objective:.1%}, so at this rate the {SLO_PERIOD}"
                        f" error budget lasts {30 / a.factor:.1f} days."
                    ),
                    runbook_anchor=a.runbook_anchor,
                    signals=(long_,),
                )
            )
    return RuleGroup("switchboard-slo-alerts", tuple(rules))


def platform_alert_rules() -> RuleGroup:
    kv_failures = "sum by (model) (rate(switchboard_kv_transfer_failures_total[5m]))"
    kv_ok = "sum by (model) (rate(switchboard_kv_transfer_seconds_count[5m]))"
    rules = (
        AlertRule(
            alert="SwitchboardNoLeader",
            expr="sum(switchboard_leader) < 1\nor\nabsent(switchboard_leader)",
            for_="1m",
            severity="page",
            summary="No control-plane replica is the leader",
            description=(
                "No replica has reported leadership for a minute: nothing reconciles, places or"
                " replaces workers (serving goes on with the workers already registered)."
            ),
            runbook_anchor="no-leader",
            signals=("sum(switchboard_leader)",),
        ),
        AlertRule(
            alert="SwitchboardNodesLost",
            expr=(
                "max_over_time(sum(switchboard_nodes)[1h:1m]) - sum(switchboard_nodes) > 0"
                '\nor\nsum(switchboard_nodes{state="unhealthy"}) > 0'
            ),
            for_="2m",
            severity="page",
            summary="{{ $value }} node(s) lost",
            description=(
                "Fewer nodes are registered than at some point in the last hour, or nodes"
                " report unhealthy: their workers are gone and the reconciler is replacing them"
                " where capacity allows."
            ),
            runbook_anchor="nodes-lost",
            signals=("sum(switchboard_nodes)",),
        ),
        AlertRule(
            alert="SwitchboardWorkersCrashLooping",
            expr=(
                "sum by (deployment, pool) (increase(switchboard_worker_restarts_total[15m])) >= 3"
            ),
            for_="1m",
            severity="page",
            summary="Workers of {{ $labels.deployment }}/{{ $labels.pool }} keep dying",
            description=(
                "{{ $value | humanize }} replicas of pool {{ $labels.pool }} were replaced after"
                " dying in the last 15 minutes."
            ),
            runbook_anchor="workers-crash-looping",
            signals=("sum by (deployment, pool) (switchboard_worker_restarts_total)",),
        ),
        AlertRule(
            alert="SwitchboardKvTransferFailures",
            expr=(f"{kv_failures}\n/\n({kv_failures}\n + {_complete(kv_ok, kv_failures)})\n> 0.05"),
            for_="5m",
            severity="page",
            summary="KV cache transfers of {{ $labels.model }} are failing",
            description=(
                "{{ $value | humanizePercentage }} of KV transfers from prefill to decode"
                " workers failed over 5 minutes: those requests are prefilled again or fail."
            ),
            runbook_anchor="kv-transfer-failures",
            signals=(kv_ok, "sum by (model) (switchboard_kv_transfer_failures_total)"),
        ),
    )
    return RuleGroup("switchboard-platform-alerts", rules)


def recording_groups() -> tuple[RuleGroup, ...]:
    return (slo_recording_rules(), latency_recording_rules())


def alert_groups() -> tuple[RuleGroup, ...]:
    return (slo_alert_rules(), platform_alert_rules())


def recording_rules() -> list[RecordingRule]:
    return [r for g in recording_groups() for r in g.rules if isinstance(r, RecordingRule)]


def alert_rules() -> list[AlertRule]:
    return [r for g in alert_groups() for r in g.rules if isinstance(r, AlertRule)]
