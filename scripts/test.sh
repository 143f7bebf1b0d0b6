#!/usr/bin/env bash
# Set up a virtualenv (.venv) with the package and its test extras, then run lint, types, tests.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,dev]"
.venv/bin/python -m ruff check celery_adaptive tests bench
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
