"""etcd adapter (client: aetcd). The only package that imports aetcd."""
