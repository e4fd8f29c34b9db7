"""The rule files and Prometheus configurations pass Debian's ``promtool``: ``check rules``,
``check config``, and the rule unit tests in ``deploy/prometheus/tests/`` (``test rules``),
which must cover every alert both firing and staying quiet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.local.monitoring import (
    PrometheusSettings,
    ScrapeTargets,
    dump_config,
    prometheus_config,
)
from dashboards.rules import alert_rules

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make setup` installs Debian's prometheus package"
    return path


def run(argv: list[str], cwd: Path = ROOT) -> str:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(argv)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def test_rule_files_pass_promtool_check(promtool: str) -> None:
    out = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert out.count("SUCCESS") == len(RULE_FILES)


def test_rule_unit_tests_pass(promtool: str) -> None:
    out = run([promtool, "test", "rules", *(str(p.relative_to(PROM)) for p in RULE_TESTS)], PROM)
    assert out.count("SUCCESS") == len(RULE_TESTS)


def test_rule_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        doc: dict[str, Any] = yaml.safe_load(path.read_text())
        for case in doc["tests"]:
            for t in case.get("alert_rule_test", []):
                (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {a.alert for a in alert_rules()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"


def test_the_example_and_generated_configs_pass_promtool(promtool: str, tmp_path: Path) -> None:
    run([promtool, "check", "config", "prometheus.yml"], PROM)
    config = prometheus_config(
        ScrapeTargets(
            gateways=["127.0.0.1:8000"],
            controlplanes=["127.0.0.1:9400"],
            node_agents=["127.0.0.1:9401"],
            workers=["127.0.0.1:9500"],
            sd_urls=["http://127.0.0.1:9400/sd/targets"],
        ),
        PrometheusSettings(scrape_interval="1s", evaluation_interval="1s"),
    )
    jobs = [j["job_name"] for j in config["scrape_configs"]]
    assert jobs == [
        "switchboard-gateway",
        "switchboard-controlplane",
        "switchboard-node-agent",
        "switchboard-worker",
        "switchboard-discovered",
    ]
    assert [Path(p).name for p in config["rule_files"]] == ["alerts.yml", "recording.yml"]
    (tmp_path / "prometheus.yml").write_text(dump_config(config))
    out = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert "2 rule files found" in out


def test_make_up_monitoring_scrapes_what_it_starts(promtool: str, tmp_path: Path) -> None:
    from controlplane.local.up import LocalCluster, UpSettings

    cluster = LocalCluster(UpSettings(state_dir=tmp_path, monitoring=True, gateway_port=8123))
    cp_args = cluster._metrics_args("controlplane")
    agent_args = [cluster._metrics_args(f"agent-local-{i}") for i in range(2)]
    assert cp_args[0] == "--metrics-port" and all(a[0] == "--metrics-port" for a in agent_args)
    config = cluster.prometheus_config()
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    static = {
        name: job["static_configs"][0]["targets"]
        for name, job in jobs.items()
        if "static_configs" in job
    }
    assert static == {
        "switchboard-gateway": ["127.0.0.1:8123"],
        "switchboard-controlplane": [f"127.0.0.1:{cp_args[1]}"],
        "switchboard-node-agent": [f"127.0.0.1:{a[1]}" for a in agent_args],
    }
    sd = jobs["switchboard-discovered"]
    assert sd["http_sd_configs"][0]["url"] == f"http://127.0.0.1:{cp_args[1]}/sd/targets"
    assert all(f"127\\.0\\.0\\.1:{a[1]}" in sd["relabel_configs"][0]["regex"] for a in agent_args)
    (tmp_path / "prometheus.yml").write_text(dump_config(config))
    run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    # without monitoring, components get no metrics flags
    plain = LocalCluster(UpSettings(state_dir=tmp_path))
    assert plain._metrics_args("controlplane") == []
