"""Telemetry: every Prometheus metric defined once (``metrics``), tracing (``tracing``), and
the small HTTP server that serves ``/metrics`` for components without an HTTP port
(``http_server``)."""
