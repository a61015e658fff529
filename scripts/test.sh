#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them.
# System: Chromium for the browser test, PostgreSQL for the SQL-backend tests (the tests make
# and remove a throwaway cluster with initdb/pg_ctl themselves), strace for the durability
# test and a Java runtime for the Spark test (Debian's packages).
# Python: a venv with the CPU build of torch that lies on this machine's disk, the package
# and its dev extra (pytest, hypothesis, moto_server, playwright, psycopg2, transformers, pyspark, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "note: missing ${missing[*]} (apt-get install ${missing[*]}); tests that need them fail or skip" >&2
    fi
fi
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e '.[dev]'
.venv/bin/ruff check . && .venv/bin/ruff format --check .   # the code's own standard, before the tests
exec .venv/bin/python -m pytest "$@"
