"""Prometheus for a local Switchboard: its configuration (pure) and its process.

``prometheus_config`` builds the ``prometheus.yml`` that scrapes every component: static
targets for the processes the caller started itself (gateway, control plane, node agents) and
Prometheus HTTP service discovery from the control plane's ``/sd/targets`` for what comes and
goes (workers placed on Ray, on ports nobody chose in advance). The recording and alert rules
of ``deploy/prometheus/rules/`` are loaded. ``PrometheusServer`` runs Debian's ``prometheus``
binary on 127.0.0.1 with its data under a directory of the caller's (``make up`` uses
``.switchboard/prometheus``), stopped by PID like every other child.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.local.procs import ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = REPO_ROOT / "deploy" / "prometheus" / "rules"
DEFAULT_PROMETHEUS_PORT = 9090
SD_JOBS = {
    "worker": "switchboard-worker",
    "node_agent": "switchboard-node-agent",
    "gateway": "switchboard-gateway",
}
"""The job of a discovered target, by the ``component`` label ``/sd/targets`` gives it."""


@dataclass(frozen=True)
class ScrapeTargets:
    """Where the components serve ``/metrics`` (``host:port``)."""

    gateways: Sequence[str] = ()
    controlplanes: Sequence[str] = ()
    node_agents: Sequence[str] = ()
    workers: Sequence[str] = ()
    """Workers started outside the control plane (tests); placed workers come from ``sd_urls``."""
    sd_urls: Sequence[str] = ()
    """Prometheus HTTP SD endpoints (the control plane's ``http://host:port/sd/targets``)."""


@dataclass(frozen=True)
class PrometheusSettings:
    scrape_interval: str = "5s"
    evaluation_interval: str = "5s"
    sd_refresh_interval: str = "5s"
    rule_files: Sequence[Path] = field(default_factory=lambda: sorted(RULES_DIR.glob("*.yml")))
    external_labels: Sequence[tuple[str, str]] = (("switchboard", "local"),)


def prometheus_config(
    targets: ScrapeTargets, settings: PrometheusSettings = PrometheusSettings()
) -> dict[str, Any]:
    """The configuration document (``yaml.safe_dump`` it to a file)."""

    def static(job: str, addrs: Sequence[str], component: str) -> dict[str, Any]:
        return {
            "job_name": job,
            "static_configs": [{"targets": list(addrs), "labels": {"component": component}}],
        }

    jobs: list[dict[str, Any]] = []
    if targets.gateways:
        jobs.append(static("switchboard-gateway", targets.gateways, "gateway"))
    if targets.controlplanes:
        jobs.append(static("switchboard-controlplane", targets.controlplanes, "controlplane"))
    if targets.node_agents:
        jobs.append(static("switchboard-node-agent", targets.node_agents, "node_agent"))
    if targets.workers:
        jobs.append(static("switchboard-worker", targets.workers, "worker"))
    if targets.sd_urls:
        static_addresses = (*targets.gateways, *targets.node_agents, *targets.workers)
        jobs.append(
            {
                "job_name": "switchboard-discovered",
                "http_sd_configs": [
                    {"url": url, "refresh_interval": settings.sd_refresh_interval}
                    for url in targets.sd_urls
                ],
                "relabel_configs": [
                    # what this config scrapes statically is not scraped twice
                    {
                        "source_labels": ["__address__"],
                        "regex": "|".join(_regex_escape(a) for a in static_addresses) or "^$",
                        "action": "drop",
                    },
                    # the same job names as the static jobs: one `up{job=...}` per component
                    *(
                        {
                            "source_labels": ["component"],
                            "regex": component,
                            "target_label": "job",
                            "replacement": job,
                        }
                        for component, job in SD_JOBS.items()
                    ),
                ],
            }
        )
    return {
        "global": {
            "scrape_interval": settings.scrape_interval,
            "scrape_timeout": _timeout(settings.scrape_interval),
            "evaluation_interval": settings.evaluation_interval,
            "external_labels": dict(settings.external_labels),
        },
        "rule_files": [str(p) for p in settings.rule_files],
        "scrape_configs": jobs,
    }


def _regex_escape(address: str) -> str:
    return address.replace(".", r"\.")


def _timeout(interval: str) -> str:
    """A scrape timeout no longer than the interval (Prometheus refuses one that is)."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if interval.endswith(unit) and interval[: -len(unit)].replace(".", "", 1).isdigit():
            seconds = float(interval[: -len(unit)]) * units[unit]
            return f"{max(int(min(seconds, 10.0) * 1000), 100)}ms"
    raise ValueError(f"bad interval {interval!r} (e.g. 5s, 1m)")


def dump_config(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise FileNotFoundError(
            "prometheus is not installed (run `make setup`, or apt-get install prometheus)"
        )
    return path


class PrometheusServer:
    """One Prometheus on 127.0.0.1 with its own data directory and configuration file."""

    def __init__(
        self,
        data_dir: Path,
        config: dict[str, Any],
        *,
        port: int = 0,
        log_path: Path | None = None,
        retention: str = "15d",
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self.port = port or free_port()
        self.log_path = log_path or data_dir.parent / "prometheus.log"
        self.retention = retention
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "prometheus.yml"

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dump_config(self.config))
        argv = [
            prometheus_binary(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir / 'data'}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process = ManagedProcess("prometheus", argv, self.log_path).start()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and not self.process.alive():
                raise RuntimeError(f"prometheus exited:\n{self.process.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready on {self.url} after {timeout_s}s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
