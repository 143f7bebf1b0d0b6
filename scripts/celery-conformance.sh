#!/usr/bin/env bash
# Run Celery's own integration suite (t/integration of the installed Celery version) against
# prefork and against celery_adaptive:Pool, on RabbitMQ+Redis and on Redis+Redis, and compare.
#
# Usage: scripts/celery-conformance.sh [options]
#   --fast                 the CI slice (FAST_SLICE below), one pytest session per layout
#   --pools LIST           prefork,adaptive (default both)
#   --layouts LIST         rabbitmq,redis (default both): broker layouts, see below
#   --files LIST           test files of t/integration (default test_tasks.py,test_canvas.py,test_inspect.py)
#   --out DIR              where JUnit XML, logs and the summary go (default .conformance/results/<time>)
#   --private-redis        start a redis-server of this run's own (on a free loopback port) and
#                          use its DB 0 for everything: no other run's keys or pub/sub channels
#                          (Celery's tests count PUBSUB CHANNELS, server-wide) and Celery's tests
#                          that read the backend's keys through DB 0 see them
#   --test-timeout S       pytest-timeout cap per test (default 300, Celery's own mark; 60 with --fast)
#   --run-timeout S        wall-clock limit of one pytest invocation (default 2400; 300 with --fast)
#   -- ARGS                passed on to pytest
#
# Layouts: "rabbitmq" = RabbitMQ broker + Redis result backend (Celery's own CI layout);
# "redis" = Redis broker + Redis backend. $AMQP_URL / $REDIS_URL when they answer, else
# amqp://guest:guest@127.0.0.1:5672// and redis://127.0.0.1:6379. A layout whose servers do
# not answer is skipped with a message. Runs are kept apart from other test runs: RabbitMQ
# vhost $CONFORMANCE_VHOST (default celery-conformance; made with rabbitmqctl, or the
# management API on loopback, afresh before each run, and removed at the end) and Redis DBs
# 13 (the rabbitmq layout's backend), 14 and 15 (the redis layout's broker and backend;
# $CONFORMANCE_REDIS_DBS=13,14,15 changes them), flushed before each run. Celery's tasks.py
# also opens Redis DB 0 (REDIS_HOST/REDIS_PORT) in a few canvas tests; its keys are per test.
#
# Exit status: 0 when the adaptive pool fails no test that prefork passes (with only the
# adaptive pool: fails no test at all); 1 otherwise; 2 when a run left no results.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CACHE=$ROOT/.conformance
HELPERS=$ROOT/scripts/conformance

# The --fast slice: the tests the adaptive pool failed before the fixes in docs/conformance.md
# (and the two that need the harness's log forwarding), plus ping/inspect checks. One session per layout, test_inspect first: a worker broken by
# test_query_task shows up in the canvas tests that follow it, as it did in a full session.
FAST_SLICE=(
  test_inspect.py::test_Inspect::test_ping
  test_inspect.py::test_Inspect::test_active
  test_inspect.py::test_Inspect::test_query_task
  test_inspect.py::test_Inspect::test_stats
  test_inspect.py::test_Inspect::test_report
  test_inspect.py::test_Inspect::test_revoked
  test_inspect.py::test_Inspect::test_hello_stamps_received_revoked_ids_locally
  test_inspect.py::test_Inspect::test_conf
  test_canvas.py::test_chain::test_parent_ids
  test_canvas.py::test_result_set::test_result_set
  test_tasks.py::test_tasks::test_expired
  test_tasks.py::test_tasks::test_revoked
  test_tasks.py::test_trace_log_arguments::test_task_success
  test_tasks.py::test_trace_log_arguments::test_task_failed
)

fast=0
private_redis=0
pools=prefork,adaptive
layouts=rabbitmq,redis
files=test_tasks.py,test_canvas.py,test_inspect.py
out=""
test_timeout=""
run_timeout=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fast) fast=1 ;;
    --private-redis) private_redis=1 ;;
    --pools) pools=$2; shift ;;
    --layouts) layouts=$2; shift ;;
    --files) files=$2; shift ;;
    --out) out=$2; shift ;;
    --test-timeout) test_timeout=$2; shift ;;
    --run-timeout) run_timeout=$2; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
if [ "$fast" = 1 ]; then
  test_timeout=${test_timeout:-60}
  run_timeout=${run_timeout:-300}
else
  test_timeout=${test_timeout:-300}
  run_timeout=${run_timeout:-2400}
fi

pool_spec() {
  case "$1" in
    prefork) echo prefork ;;
    adaptive) echo celery_adaptive:Pool ;;
    *) echo "unknown pool: $1 (prefork or adaptive)" >&2; exit 64 ;;
  esac
}

# ---------------------------------------------------------------- the suite of this Celery
VERSION=$("$PY" -c 'import celery; print(celery.__version__)')
SRC=$CACHE/celery-$VERSION
if [ ! -f "$SRC/t/integration/conftest.py" ]; then
  mkdir -p "$CACHE/sdist"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "celery==$VERSION" -d "$CACHE/sdist"
  tarball=$(ls "$CACHE/sdist/celery-$VERSION".tar.gz)
  rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
  # t/ (integration suite and its helpers) and pyproject.toml (pytest settings: test classes
  # are named test_*, markers).
  tar -xzf "$tarball" -C "$SRC.tmp" --strip-components=1 "celery-$VERSION/t" "celery-$VERSION/pyproject.toml"
  rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
fi
if ! "$PY" -c 'import pydantic, pytest_timeout' 2>/dev/null; then
  echo "Celery's integration suite needs pydantic and pytest-timeout: pip install -e '.[test]'" >&2
  exit 64
fi

# ---------------------------------------------------------------- brokers
first_answering() {  # the first URL that answers, else the last one
  local url
  for url in "$@"; do
    if [ -n "$url" ] && "$PY" "$HELPERS/brokers.py" answers "$url" 2>/dev/null; then echo "$url"; return; fi
  done
  echo "${@: -1}"
}
vhost_mode=""   # rabbitmqctl | api | none
redis_pid=""    # the private redis-server (--private-redis)
redis_dir=""
cleanup() {
  case "$vhost_mode" in
    rabbitmqctl) timeout 60 rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true ;;
    api) "$PY" "$HELPERS/brokers.py" delete-vhost-api "$AMQP_BASE" "$VHOST" || true ;;
  esac
  if [ -n "$redis_pid" ]; then
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    rm -rf "$redis_dir"
  fi
}
trap cleanup EXIT

AMQP_BASE=$(first_answering "${AMQP_URL:-}" amqp://guest:guest@127.0.0.1:5672//)
if [ "$private_redis" = 1 ]; then
  read -r redis_bin redis_port < <("$PY" -c 'from celery_adaptive.embedded_redis import find_redis_server, free_loopback_port; print(find_redis_server(), free_loopback_port())')
  redis_dir=$(mktemp -d)
  "$redis_bin" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$redis_dir" \
    --daemonize no --loglevel warning > "$redis_dir/log" 2>&1 &
  redis_pid=$!
  REDIS_BASE=redis://127.0.0.1:$redis_port/0
  for _ in $(seq 100); do
    "$PY" "$HELPERS/brokers.py" answers "$REDIS_BASE" 2>/dev/null && break
    sleep 0.1
  done
  CONFORMANCE_REDIS_DBS=${CONFORMANCE_REDIS_DBS:-0,0,0}
else
  REDIS_BASE=$(first_answering "${REDIS_URL:-}" redis://127.0.0.1:6379/0)
fi
VHOST=${CONFORMANCE_VHOST:-celery-conformance}
# Redis DBs: the rabbitmq layout's backend, the redis layout's broker and its backend.
IFS=, read -r DB_AMQP_BACKEND DB_REDIS_BROKER DB_REDIS_BACKEND <<< "${CONFORMANCE_REDIS_DBS:-13,14,15}"
read -r REDIS_HOST REDIS_PORT < <("$PY" -c 'import sys; from urllib.parse import urlsplit; u = urlsplit(sys.argv[1]); print(u.hostname or "127.0.0.1", u.port or 6379)' "$REDIS_BASE")
export REDIS_HOST REDIS_PORT

redis_db_url() { "$PY" "$HELPERS/brokers.py" redis-db "$REDIS_BASE" "$1"; }

reset_vhost() {
  # Drop and re-create the vhost: no message or queue of an earlier run survives.
  case "$vhost_mode" in
    rabbitmqctl)
      timeout 60 rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true
      timeout 60 rabbitmqctl -q add_vhost "$VHOST" >/dev/null
      timeout 60 rabbitmqctl -q set_permissions -p "$VHOST" "$("$PY" "$HELPERS/brokers.py" amqp-user "$AMQP_BASE")" '.*' '.*' '.*' >/dev/null ;;
    api) "$PY" "$HELPERS/brokers.py" reset-vhost-api "$AMQP_BASE" "$VHOST" ;;
    *) "$PY" "$HELPERS/brokers.py" purge "$AMQP_BASE" ;;
  esac
}


declare -A BROKER BACKEND DBS
IFS=, read -r -a layout_list <<< "$layouts"
active_layouts=()
for layout in "${layout_list[@]}"; do
  case "$layout" in
    rabbitmq)
      if ! "$PY" "$HELPERS/brokers.py" answers "$AMQP_BASE" || ! "$PY" "$HELPERS/brokers.py" answers "$REDIS_BASE"; then
        echo "SKIP layout rabbitmq: RabbitMQ at $AMQP_BASE or Redis at $REDIS_BASE does not answer" >&2
        continue
      fi
      if command -v rabbitmqctl >/dev/null && timeout 60 rabbitmqctl -q list_vhosts >/dev/null 2>&1; then
        vhost_mode=rabbitmqctl
      elif "$PY" "$HELPERS/brokers.py" api-available "$AMQP_BASE"; then
        vhost_mode=api
      else
        vhost_mode=none
        echo "NOTE: cannot create a RabbitMQ vhost (no rabbitmqctl, no management API on loopback);" \
             "using $AMQP_BASE as is and purging Celery's queue before each run" >&2
      fi
      if [ "$vhost_mode" != none ]; then
        BROKER[rabbitmq]=$("$PY" "$HELPERS/brokers.py" amqp-vhost "$AMQP_BASE" "$VHOST")
      else
        BROKER[rabbitmq]=$AMQP_BASE
      fi
      BACKEND[rabbitmq]=$(redis_db_url "$DB_AMQP_BACKEND")
      DBS[rabbitmq]=$DB_AMQP_BACKEND ;;
    redis)
      if ! "$PY" "$HELPERS/brokers.py" answers "$REDIS_BASE"; then
        echo "SKIP layout redis: Redis at $REDIS_BASE does not answer" >&2
        continue
      fi
      BROKER[redis]=$(redis_db_url "$DB_REDIS_BROKER")
      BACKEND[redis]=$(redis_db_url "$DB_REDIS_BACKEND")
      DBS[redis]="$DB_REDIS_BROKER $DB_REDIS_BACKEND" ;;
    *) echo "unknown layout: $layout (rabbitmq or redis)" >&2; exit 64 ;;
  esac
  active_layouts+=("$layout")
done
if [ ${#active_layouts[@]} -eq 0 ]; then
  echo "SKIP: no broker layout answers; nothing ran" >&2
  exit 0
fi

reset_layout() {
  local layout=$1 db
  for db in ${DBS[$layout]}; do
    "$PY" "$HELPERS/brokers.py" flush-redis-db "$REDIS_BASE" "$db"
  done
  if [ "$layout" = rabbitmq ]; then reset_vhost; fi
}

# ---------------------------------------------------------------- runs
# celery.contrib.testing's session worker logs at "error" by default; test_trace_log_arguments
# reads the worker's INFO records, so under that default it fails on every pool.
export WORKER_LOGLEVEL=${WORKER_LOGLEVEL:-info}
out=${out:-$CACHE/results/$(date -u +%Y%m%dT%H%M%SZ)$([ "$fast" = 1 ] && echo -fast)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
: > "$out/runs.tsv"
echo "Celery $VERSION suite from $SRC; results in $out"
echo "celery_adaptive from $(cd "$SRC" && "$PY" -c 'import os, celery_adaptive; print(os.path.dirname(celery_adaptive.__file__))')"

run_pytest() {  # layout pool label targets...
  local layout=$1 pool=$2 label=$3; shift 3
  local base="$out/${layout}__${pool}__${label}" rc=0 started=$SECONDS
  reset_layout "$layout"
  echo "== $layout / $pool / $label"
  # SIGINT first: pytest then writes the JUnit XML of what ran; SIGKILL if that hangs too.
  ( cd "$SRC" && env \
      CONFORMANCE_POOL="$(pool_spec "$pool")" CONFORMANCE_TEST_TIMEOUT="$test_timeout" \
      TEST_BROKER="${BROKER[$layout]}" TEST_BACKEND="${BACKEND[$layout]}" \
      PYTHONPATH="$HELPERS${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1 \
      timeout --signal=INT --kill-after=60 "$run_timeout" \
      "$PY" -m pytest -c "$SRC/pyproject.toml" --rootdir "$SRC" -p celery_conformance_plugin \
        -p no:cacheprovider --timeout "$test_timeout" -o faulthandler_timeout=$((test_timeout - 5)) \
        -rfE -q --junitxml "$base.xml" "$@" ${extra[@]+"${extra[@]}"} \
  ) > "$base.log" 2>&1 || rc=$?
  tail -n 1 "$base.log"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "   timed out after ${run_timeout}s (see $base.log)"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$layout" "$pool" "$label" "$rc" "$((SECONDS - started))" >> "$out/runs.tsv"
}

IFS=, read -r -a pool_list <<< "$pools"
IFS=, read -r -a file_list <<< "$files"
# One combination after another, never in parallel: the suite is timing-sensitive and the
# machine is shared.
for layout in "${active_layouts[@]}"; do
  for pool in "${pool_list[@]}"; do
    pool_spec "$pool" >/dev/null
    if [ "$fast" = 1 ]; then
      run_pytest "$layout" "$pool" fast "${FAST_SLICE[@]/#/t/integration/}"
    else
      for file in "${file_list[@]}"; do
        run_pytest "$layout" "$pool" "${file%.py}" "t/integration/$file"
      done
    fi
  done
done

echo
echo "Celery $VERSION, $(date -u +%Y-%m-%d), layouts: ${active_layouts[*]}"
rc=0
"$PY" "$HELPERS/report.py" "$out" | tee "$out/summary.txt" || rc=$?
exit "$rc"
