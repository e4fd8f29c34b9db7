"""Dashboards and rules as code: the committed files are what the generator renders, every
metric a query reads is defined in ``controlplane/telemetry/metrics.py`` (or recorded by our
rules), every alert links to a runbook section, and the dashboards carry the template
variables."""

from __future__ import annotations

import json
import re

import pytest

from controlplane.telemetry.metrics import exposed_names, metric_names
from dashboards.definitions import all_dashboards
from dashboards.generate import DASHBOARD_DIR, ROOT, render_all, stale_files
from dashboards.promql import metric_names as names_in
from dashboards.rules import alert_rules, recording_rules
from dashboards.slo import OBJECTIVES, check_objectives

PROMETHEUS_BUILTINS = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
"""Series Prometheus makes itself (scrape health, alert state)."""


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel target and template variable."""
    out: list[tuple[str, str]] = []
    for d in all_dashboards():
        for p in d.panels():
            out += [(f"{d.uid} / {p.title}", t.expr) for t in p.targets]
        out += [(f"{d.uid} / ${v.name}", v.query) for v in d.variables]
    return out


def rule_queries() -> list[tuple[str, str]]:
    out = [(f"record {r.record}", r.expr) for r in recording_rules()]
    for a in alert_rules():
        out.append((f"alert {a.alert}", a.expr))
        out += [(f"alert {a.alert} signal", s) for s in a.signals]
    return out


def family_of(series: str) -> str:
    """The metrics-module name a stored series belongs to (``x_bucket`` -> ``x``)."""
    defined = metric_names()
    if series in defined:
        return series
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series[: -len(suffix)] in defined:
            return series[: -len(suffix)]
    return series


def test_committed_files_are_what_the_generator_renders() -> None:
    stale = [str(p.relative_to(ROOT)) for p in stale_files()]
    assert stale == [], f"stale generated files {stale}: run `python -m dashboards.generate`"


def test_generator_renders_the_four_dashboards_and_both_rule_files() -> None:
    names = {str(p.relative_to(ROOT)) for p in render_all()}
    assert {
        "dashboards/json/switchboard-sla.json",
        "dashboards/json/switchboard-fleet.json",
        "dashboards/json/switchboard-router.json",
        "dashboards/json/switchboard-controlplane.json",
        "deploy/prometheus/rules/recording.yml",
        "deploy/prometheus/rules/alerts.yml",
        "deploy/prometheus/prometheus.yml",
    } <= names


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (le) (rate(a_bucket{model=~"$model"}[$__rate_interval]))', {"a_bucket"}),
        ("x:y:rate5m / on (sla_class) group_left z:ratio", {"x:y:rate5m", "z:ratio"}),
        ("x / on (c) group_left (d) (1 - y)", {"x", "y"}),
        ('max_over_time(sum(n)[1h:1m]) - sum(n) > 0 or sum(n{state="u"}) > 0', {"n"}),
        ("absent(leader) or sum without (replica) (leader) < 1e-3", {"leader"}),
        ("histogram_quantile(0.99, sum by (le, op) (rate(e_bucket[5m]))) offset 5m", {"e_bucket"}),
        ("label_values(requests_total, tenant)", {"requests_total"}),
        ('count_values("v", build_info) and bool 2 > inf', {"build_info"}),
    ],
)
def test_metric_names_are_found_in_promql(expr: str, expected: set[str]) -> None:
    assert names_in(expr) == expected


def test_every_metric_a_dashboard_or_rule_reads_is_defined() -> None:
    recorded = {r.record for r in recording_rules()}
    known = exposed_names() | recorded | PROMETHEUS_BUILTINS
    unknown: dict[str, set[str]] = {}
    for where, expr in dashboard_queries() + rule_queries():
        names = names_in(expr)
        assert names or expr.startswith("vector("), f"{where}: no metric found in {expr!r}"
        for name in names - known:
            unknown.setdefault(name, set()).add(where)
    assert unknown == {}, f"metrics not in controlplane/telemetry/metrics.py: {unknown}"


def test_report_exported_metrics_no_dashboard_shows() -> None:
    """A report, not a check: metrics defined but drawn by no dashboard (directly or through a
    recording rule)."""
    rules = {r.record: r.expr for r in recording_rules()}
    shown: set[str] = set()
    todo = [name for _, expr in dashboard_queries() for name in names_in(expr)]
    while todo:
        name = todo.pop()
        if name in shown:
            continue
        shown.add(name)
        if name in rules:
            todo += list(names_in(rules[name]))
    families = {family_of(n) for n in shown}
    not_shown = sorted(set(metric_names()) - families)
    print(f"\nexported metrics no dashboard shows ({len(not_shown)}): {', '.join(not_shown)}")
    assert len(families & set(metric_names())) > 0.7 * len(metric_names())


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_links_to_a_runbook_section_with_diagnosis_and_mitigation() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    sections = {
        _slug(m.group(1)): body
        for m, body in zip(
            re.finditer(r"^## (.+)$", runbook, re.MULTILINE),
            re.split(r"^## .+$", runbook, flags=re.MULTILINE)[1:],
            strict=True,
        )
    }
    alerts = alert_rules()
    assert {a.alert for a in alerts} >= {
        "SwitchboardSLOFastBurn",
        "SwitchboardSLOSlowBurn",
        "SwitchboardNoLeader",
        "SwitchboardNodesLost",
        "SwitchboardWorkersCrashLooping",
        "SwitchboardKvTransferFailures",
    }
    for a in alerts:
        path, _, anchor = a.runbook_url.partition("#")
        assert path == "docs/runbook.md"
        assert anchor in sections, f"{a.alert}: no section #{anchor} in docs/runbook.md"
        body = sections[anchor]
        for part in ("Impact", "Diagnosis", "Mitigation"):
            assert f"**{part}" in body, f"runbook #{anchor} lacks {part}"
        assert "switchboard " in body or anchor.startswith("slo-"), f"#{anchor}: no CLI command"


def test_slo_alerts_exist_per_class_with_the_workbook_windows() -> None:
    check_objectives()
    burn = [a for a in alert_rules() if a.alert.startswith("SwitchboardSLO")]
    pairs = {(a.alert, dict(a.labels)["sla_class"]) for a in burn}
    assert pairs == {
        (name, cls)
        for name in ("SwitchboardSLOFastBurn", "SwitchboardSLOSlowBurn")
        for cls in OBJECTIVES
    }
    fast = next(a for a in burn if a.alert == "SwitchboardSLOFastBurn")
    assert "rate1h" in fast.expr and "rate5m" in fast.expr and "14.4" in fast.expr
    slow = next(a for a in burn if a.alert == "SwitchboardSLOSlowBurn")
    assert "rate6h" in slow.expr and "rate30m" in slow.expr and "(6 *" in slow.expr


def test_dashboards_have_template_variables_and_a_sane_layout() -> None:
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        d = json.loads(path.read_text())
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert {"datasource", "tenant", "model", "class"} <= set(variables), path.name
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for p in d["panels"]:
            pos = p["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{path.name} / {p['title']}"
            if p["type"] == "row":
                continue
            assert p["targets"], f"{path.name} / {p['title']}: no query"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"
                assert t["expr"].count("(") == t["expr"].count(")")


def test_sla_dashboard_filters_every_query_by_the_template_variables() -> None:
    sla = next(d for d in all_dashboards() if d.uid == "switchboard-sla")
    for p in sla.panels():
        for t in p.targets:
            if "objective" in t.expr and "tenant" not in t.expr:
                assert '"$class"' in t.expr
                continue
            for var in ("$tenant", "$model"):
                assert var in t.expr, f"{p.title}: {t.expr} ignores {var}"
