"""Node agent: discovers a host's GPUs and keeps its registration alive in etcd."""
