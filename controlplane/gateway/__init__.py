"""The tenant gateway: OpenAI HTTP and gRPC Inference in front of the workers (see main.py)."""
