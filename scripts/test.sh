#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them.
# System: Chromium for the browser test (Debian's package; no browser download).
# Python: a venv with the CPU build of torch that lies on this machine's disk, the package
# and its dev extra (pytest, hypothesis, moto_server, playwright, transformers, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: no chromium on PATH; the browser test will be skipped (apt-get install chromium)" >&2
    fi
fi
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e '.[dev]'
exec .venv/bin/python -m pytest "$@"
