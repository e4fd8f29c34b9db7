"""Switchboard workers: engines that make tokens, behind the Worker gRPC service."""
