"""A small typed model of Grafana dashboards (schema version 39) and its JSON rendering.

Only what Switchboard's dashboards use: rows, time series / stat / bar gauge / table panels
with Prometheus targets, a datasource variable and query variables. Rendering is
deterministic (same input, same bytes), so the committed JSON can be compared with a fresh
render. Panels are laid out left to right in rows of 24 grid units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PanelKind = Literal["timeseries", "stat", "bargauge", "table"]


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel. ``legend`` is Grafana's legend format (``{{label}}``)."""

    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Threshold:
    value: float | None
    """None: the base step (everything below the next one)."""
    color: str


@dataclass(frozen=True)
class Panel:
    title: str
    kind: PanelKind
    targets: tuple[Target, ...]
    description: str = ""
    unit: str = "short"
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    decimals: int | None = None
    thresholds: tuple[Threshold, ...] = ()
    stacked: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.width <= 24:
            raise ValueError(f"panel {self.title!r}: width {self.width} must be 1..24")
        if not self.targets:
            raise ValueError(f"panel {self.title!r} has no query")


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class QueryVariable:
    """A template variable filled from ``label_values(...)``; multi-select with "All" (``.*``)."""

    name: str
    label: str
    query: str
    """``label_values(metric, label)``."""


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[QueryVariable, ...] = ()
    tags: tuple[str, ...] = ("switchboard",)
    refresh: str = "30s"
    time_from: str = "now-6h"
    links: tuple[str, ...] = field(default=("switchboard",))
    """Tags of dashboards to link to from the top bar."""

    def panels(self) -> list[Panel]:
        return [p for row in self.rows for p in row.panels]

    def to_json(self) -> dict[str, Any]:
        return render(self)


def _field_config(p: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    if p.decimals is not None:
        defaults["decimals"] = p.decimals
    if p.thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": t.color, "value": t.value} for t in p.thresholds],
        }
    if p.kind == "timeseries":
        custom: dict[str, Any] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
        }
        if p.stacked:
            custom["stacking"] = {"mode": "normal", "group": "A"}
        if p.thresholds:
            custom["thresholdsStyle"] = {"mode": "line"}
        defaults["custom"] = custom
        defaults["color"] = {"mode": "palette-classic"}
    else:
        defaults["color"] = {"mode": "thresholds"}
    return {"defaults": defaults, "overrides": []}


def _options(p: Panel) -> dict[str, Any]:
    if p.kind == "timeseries":
        return {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                       "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }  # fmt: skip
    if p.kind in ("stat", "bargauge"):
        options: dict[str, Any] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
        }
        if p.kind == "stat":
            options.update({"colorMode": "value", "graphMode": "area", "textMode": "auto"})
        else:
            options.update({"displayMode": "gradient", "showUnfilled": True})
        return options
    return {"showHeader": True, "footer": {"show": False}}


def _panel_json(p: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for i, t in enumerate(p.targets):
        target: dict[str, Any] = {
            "datasource": DATASOURCE,
            "expr": t.expr,
            "refId": chr(ord("A") + i),
            "legendFormat": t.legend or "__auto",
            "range": not (t.instant or p.kind == "table"),
            "instant": t.instant or p.kind == "table",
        }
        if p.kind == "table":
            target["format"] = "table"
        targets.append(target)
    out: dict[str, Any] = {
        "id": panel_id,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": _field_config(p),
        "options": _options(p),
        "targets": targets,
    }
    if p.kind == "table":
        out["transformations"] = [
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}}},
        ]
    return out


def _variable_json(v: QueryVariable) -> dict[str, Any]:
    return {
        "name": v.name,
        "label": v.label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": v.query,
        "query": {"query": v.query, "refId": f"{v.name}-variable"},
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
    }


def render(d: Dashboard) -> dict[str, Any]:
    """The Grafana JSON model of ``d`` (import it in Grafana, or provision it from a file)."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row in d.rows:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for p in row.panels:
            if x + p.width > 24:
                x = 0
                y += line_height
                line_height = 0
            panels.append(_panel_json(p, next_id, x, y))
            next_id += 1
            x += p.width
            line_height = max(line_height, p.height)
        y += line_height
    datasource_var = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
    }
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": list(d.tags),
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": d.refresh,
        "time": {"from": d.time_from, "to": "now"},
        "timezone": "utc",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "dashboards",
                "tags": list(d.links),
                "asDropdown": True,
                "title": "Switchboard",
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": [datasource_var, *(_variable_json(v) for v in d.variables)]},
        "panels": panels,
    }
