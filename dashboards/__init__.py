"""Grafana dashboards and Prometheus rules as code (see dashboards/README.md)."""
