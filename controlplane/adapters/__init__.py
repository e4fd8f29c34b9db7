"""Adapters: one per outside system, and the only place that system is imported."""
