"""Switchboard's public API, generated from proto/switchboard/v1 (see scripts/protogen.py)."""
