#!/usr/bin/env bash
# Run the core tests against each supported Celery version, each in its own virtualenv.
#
# Usage: scripts/celery-versions.sh [VERSION...] [-- PYTEST_ARGS...]
#   VERSION  5.6     the newest 5.6.x on PyPI (default: 5.5 5.6 5.7, the supported range
#                    celery>=5.5,<6 of pyproject.toml)
#            5.6.0   exactly that release
#            lowest  the oldest releases pyproject.toml allows: celery 5.5.0 with the oldest
#                    kombu (5.5.2) and billiard (4.2.1) that Celery accepts
#   PYTEST_ARGS replace the default selection (the unit tests plus the core real-worker
#   tests: tests/unit, tests/integration/test_pool_core.py, test_selection.py).
#
# Each version gets .versions/celery-VERSION (gitignored; reused, and brought up to date, by
# later runs). Prints a table VERSION -> installed versions, passed/failed/skipped, time, and
# exits non-zero when any version fails, errors, times out or cannot be installed.
# Not run by CI: about 3 minutes per version on 2 shared cores, so ~9 for the default three
# (plus ~1 per new env to install; see README, "Supported Celery versions").
# Bounds: VERSIONS_INSTALL_TIMEOUT (s, default 900) per install, VERSIONS_TEST_TIMEOUT (s,
# default 1200) per test run, and pytest-timeout per test.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
INSTALL_TIMEOUT=${VERSIONS_INSTALL_TIMEOUT:-900}
TEST_TIMEOUT=${VERSIONS_TEST_TIMEOUT:-1200}
DEFAULT_TESTS=(tests/unit tests/integration/test_pool_core.py tests/integration/test_selection.py)

versions=()
pytest_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then
    shift
    pytest_args=("$@")
    break
  fi
  versions+=("$1")
  shift
done
[ ${#versions[@]} -gt 0 ] || versions=(5.5 5.6 5.7)
[ ${#pytest_args[@]} -gt 0 ] || pytest_args=("${DEFAULT_TESTS[@]}")

# The pip requirements that select one VERSION.
requirements() {
  case "$1" in
    lowest) echo "celery==5.5.0 kombu==5.5.2 billiard==4.2.1" ;;
    5.[0-9]|5.[0-9][0-9]) echo "celery==$1.*" ;;
    5.[0-9]*.[0-9]*) echo "celery==$1" ;;
    *) return 1 ;;
  esac
}

for version in "${versions[@]}"; do
  if ! requirements "$version" >/dev/null; then
    echo "unknown version '$version': expected 5.N (newest 5.N.x), 5.N.M, or lowest" >&2
    exit 2
  fi
done

mkdir -p .versions
rows=()
failed=0
for version in "${versions[@]}"; do
  env_dir=".versions/celery-$version"
  log="$env_dir.log"
  started=$SECONDS
  echo "=== Celery $version: $(requirements "$version") (log: $log)"
  : >"$log"
  status=ok
  if [ ! -x "$env_dir/bin/python" ] && ! "$PYTHON" -m venv "$env_dir" >>"$log" 2>&1; then
    status=venv-failed
  fi
  if [ "$status" = ok ]; then
    # --upgrade so a reused env moves to the newest patch release; only the named
    # requirements are upgraded (pip's only-if-needed strategy for the rest).
    # shellcheck disable=SC2046 # the requirements are words on purpose
    if ! timeout --kill-after=30 "$INSTALL_TIMEOUT" "$env_dir/bin/python" -m pip install \
        --quiet --disable-pip-version-check --upgrade -e ".[test]" $(requirements "$version") \
        >>"$log" 2>&1; then
      status=install-failed
    fi
  fi
  installed="-"
  if [ "$status" = ok ]; then
    installed=$("$env_dir/bin/python" -c '
from importlib.metadata import version
print(" ".join(version(p) for p in ("celery", "kombu", "billiard")))' 2>>"$log") || installed="-"
    echo "    installed celery kombu billiard: $installed"
    junit="$env_dir/junit.xml"
    rm -f "$junit"
    # SIGINT first: pytest then runs its fixtures' teardown, which stops the workers the
    # tests started (in their own sessions, so a kill of this group would not reach them).
    # Each env keeps its own Hypothesis examples: a row's result is about that row.
    HYPOTHESIS_STORAGE_DIRECTORY="$env_dir/hypothesis" \
    timeout --signal=INT --kill-after=60 "$TEST_TIMEOUT" "$env_dir/bin/python" -m pytest \
      -q -p no:cacheprovider --durations=10 --junitxml="$junit" "${pytest_args[@]}" >>"$log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      status=timeout
    elif [ $rc -ne 0 ]; then
      status=failed
    fi
    { grep -E '^(FAILED|ERROR) ' "$log" | head -n 10; tail -n 1 "$log"; } | sed 's/^/    /'
  fi
  counts=$("$PYTHON" - "$env_dir/junit.xml" <<'EOF' 2>/dev/null || echo "- - - -"
import sys
import xml.etree.ElementTree as ET

totals = dict(tests=0, failures=0, errors=0, skipped=0)
for suite in ET.parse(sys.argv[1]).getroot().iter("testsuite"):
    for key in totals:
        totals[key] += int(suite.get(key, 0))
passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
print(passed, totals["failures"], totals["errors"], totals["skipped"])
EOF
)
  elapsed=$((SECONDS - started))
  [ "$status" = ok ] || failed=1
  # shellcheck disable=SC2086 # split the counts and versions into columns
  rows+=("$(printf '%-8s %-8s %-8s %-9s %6s %6s %6s %7s %5dm%02ds  %s' "$version" \
    $( [ "$installed" = "-" ] && echo "- - -" || echo $installed ) $counts \
    $((elapsed / 60)) $((elapsed % 60)) "$status")")
done

echo
printf '%-8s %-8s %-8s %-9s %6s %6s %6s %7s %8s  %s\n' \
  VERSION celery kombu billiard passed failed errors skipped time result
for row in "${rows[@]}"; do
  echo "$row"
done
exit $failed
