"""gRPC shells: servicers, conversions, the error table, the server builder."""
