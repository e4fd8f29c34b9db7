#!/usr/bin/env bash
# Install what Switchboard needs on a fresh machine, idempotently:
#   - etcd (Debian's etcd-server / etcd-client) when no `etcd` binary is on PATH;
#   - Prometheus and promtool (Debian's prometheus) when either binary is missing;
#   - a Python 3.11 virtualenv in .venv with the project and its dev extras (editable).
# Re-running is cheap: the venv is reinstalled only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bootstrap] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; exit 1; fi
}

if ! command -v etcd >/dev/null 2>&1; then
  log "installing etcd (apt: etcd-server etcd-client)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq etcd-server etcd-client >/dev/null
fi

# Prometheus and promtool (rule unit tests, `make up MONITORING=1`). Only the binaries are
# used: a service the package may set up is never started by Switchboard.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  log "installing prometheus (apt: prometheus)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
[ -n "$PYTHON" ] || { log "Python 3.11 is required"; exit 1; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi

stamp=".venv/.switchboard-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing the project and its dev dependencies into .venv"
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e '.[dev]'; } >.venv/pip-install.log 2>&1; then
    tail -n 40 .venv/pip-install.log >&2
    log "pip install failed (full log: .venv/pip-install.log)"
    exit 1
  fi
  rm -f .venv/.switchboard-installed-*
  touch "$stamp"
fi
