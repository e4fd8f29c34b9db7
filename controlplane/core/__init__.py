"""Functional core: pure, synchronous, deterministic. No grpc, etcd, ray, asyncio or clock."""
