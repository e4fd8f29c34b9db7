"""Service level objectives per SLA class: the one table the rules and dashboards are built from.

A request *meets its SLO* when the gateway judges it so (``controlplane/telemetry/metrics.py``,
``judge_slo``: completed, TTFT <= its class's TTFT target, mean ITL <= its ITL target, a batch
request within its deadline). The *objective* is the fraction of a tenant's requests of one
class and model that must meet it over the SLO period (30 days); ``1 - objective`` is the error
budget. The latency targets themselves come from ``controlplane/core/sla.py``.

Burn-rate alerts follow the multi-window, multi-burn-rate recipe of Google's SRE workbook
("Alerting on SLOs"): page when the last hour burned budget 14.4x faster than sustainable (2 %
of a 30-day budget in 1 h) and the last 5 minutes still do; page when the last 6 hours burned
it 6x faster (5 % in 6 h) and the last 30 minutes still do. The short window makes the alert
stop soon after the burn stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from controlplane.core.sla import DEFAULT_SLA_CLASSES

SLO_PERIOD = "30d"
"""The period the error budget is counted over."""

OBJECTIVES = MappingProxyType(
    {
        "interactive": 0.99,
        "standard": 0.99,
        "batch": 0.95,
    }
)
"""Objective (fraction of requests that meet the SLO) of each default SLA class."""

SLO_LABELS = ("tenant", "model", "sla_class")
"""What an SLO is counted by: each tenant's traffic of one model and class is its own SLO."""

RATE_WINDOWS = ("5m", "30m", "1h", "6h")
"""Windows the error ratios are recorded over (the burn-rate alerts read these)."""


@dataclass(frozen=True)
class BurnRateAlert:
    name: str
    long_window: str
    short_window: str
    factor: float
    """Burn rate: how many times faster than "exactly use the budget in the period"."""
    for_: str
    severity: str
    runbook_anchor: str

    def threshold(self, objective: float) -> str:
        """The error-ratio threshold as PromQL arithmetic (readable in Prometheus' UI)."""
        return f"({self.factor:g} * (1 - {objective:g}))"


FAST_BURN = BurnRateAlert(
    name="SwitchboardSLOFastBurn",
    long_window="1h",
    short_window="5m",
    factor=14.4,
    for_="2m",
    severity="page",
    runbook_anchor="slo-fast-burn",
)
SLOW_BURN = BurnRateAlert(
    name="SwitchboardSLOSlowBurn",
    long_window="6h",
    short_window="30m",
    factor=6.0,
    for_="15m",
    severity="page",
    runbook_anchor="slo-slow-burn",
)
BURN_RATE_ALERTS = (FAST_BURN, SLOW_BURN)


def check_objectives() -> None:
    """Every default SLA class has an objective in (0, 1) and vice versa."""
    names = {c.name for c in DEFAULT_SLA_CLASSES}
    if set(OBJECTIVES) != names:
        raise ValueError(f"objectives {sorted(OBJECTIVES)} != SLA classes {sorted(names)}")
    for name, objective in OBJECTIVES.items():
        if not 0 < objective < 1:
            raise ValueError(f"objective of {name}: {objective} must be in (0, 1)")
