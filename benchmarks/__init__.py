"""Benchmarks that run the real control plane, agents and etcd on 127.0.0.1."""
