"""The Ray adapter: replicas as detached, named placement groups and actors."""
