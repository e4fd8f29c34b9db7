"""Switchboard control plane: node registry, placement, reconciliation, routing."""

__version__ = "0.1.0"
