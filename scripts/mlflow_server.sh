#!/usr/bin/env bash
# An MLflow tracking server that every Ray node can write to (tracking.uri=http://HOST:PORT).
#
#   scripts/mlflow_server.sh start    start it in the background, wait until /health answers
#   scripts/mlflow_server.sh stop     stop the server this script started (by its pid file)
#   scripts/mlflow_server.sh status
#
# Settings (environment):
#   MLFLOW_HOST=127.0.0.1      bind address; 0.0.0.0 to let other hosts' Ray nodes reach it
#   MLFLOW_PORT=5000
#   MLFLOW_SERVER_DIR=runs/mlflow-server            pid file, log, and the default stores below
#   MLFLOW_BACKEND_STORE_URI=sqlite:///<dir>/mlflow.db   runs, params, metrics; for a team a
#                              database server, e.g. the first URL of `scripts/postgres.sh url`,
#                              postgresql+psycopg2://initstudy:PW@127.0.0.1:5433/mlflow (psycopg2-binary
#                              is a dependency). It reaches the server through the environment, not its
#                              command line, and is printed with the password masked.
#   MLFLOW_ARTIFACTS_DESTINATION=<dir>/artifacts    where the server stores artifacts it serves
#                              (clients upload through the server: no shared filesystem needed)
#   MLFLOW_WORKERS=2           server worker processes (uvicorn); each keeps its own pool of database
#                              connections, which a database server serves at once (sqlite serialises
#                              every write: several workers help a database server, not a sqlite file)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers to accept besides localhost and private IPs (MLflow
#                              3's DNS-rebinding guard), e.g. "mlflow,mlflow:5000" behind a
#                              Kubernetes Service named mlflow; MLFLOW_SERVER_CORS_ALLOWED_ORIGINS
#                              likewise for browsers on other origins (MLflow reads both itself)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false   MLflow 3's server-side job runner (GenAI evaluation
#                              jobs; seven extra processes); a study's record does not need it
#   MLFLOW=<project>/.venv/bin/mlflow
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
DIR=${MLFLOW_SERVER_DIR:-$ROOT/runs/mlflow-server}
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$DIR/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-$DIR/artifacts}
WORKERS=${MLFLOW_WORKERS:-2}
START_TIMEOUT_S=${MLFLOW_START_TIMEOUT_S:-90}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
if [ -z "${MLFLOW:-}" ]; then
  if [ -x "$ROOT/.venv/bin/mlflow" ]; then MLFLOW=$ROOT/.venv/bin/mlflow; else MLFLOW=$(command -v mlflow || true); fi
fi
[ -n "$MLFLOW" ] || { echo "error: no mlflow CLI (run scripts/setup.sh, or set MLFLOW=/path/to/mlflow)" >&2; exit 2; }
PYTHON=$(dirname "$MLFLOW")/python
[ -x "$PYTHON" ] || PYTHON=python3
PIDFILE=$DIR/server.pid
# The address clients use: the loopback when bound to all interfaces.
CLIENT_HOST=$HOST
case "$HOST" in 0.0.0.0|::|'[::]') CLIENT_HOST=127.0.0.1 ;; esac
URL=http://$CLIENT_HOST:$PORT

die() { echo "error: $*" >&2; exit 1; }
masked() { sed -E 's#://([^:/@]+):[^@]*@#://\1:***@#' <<<"$1"; }
alive() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
healthy() {
  "$PYTHON" -c 'import sys, urllib.request; sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).read().strip() != b"OK")' \
    "$URL/health" 2>/dev/null
}

# A database server that refuses us fails the start in seconds: MLflow itself retries for about
# two minutes (backoff) before it gives up, and logs the same error each time.
check_database() {
  case "$BACKEND" in postgresql*|mysql*) ;; *) return 0 ;; esac
  local why
  why=$(MLFLOW_BACKEND_STORE_URI=$BACKEND "$PYTHON" -c '
import os, sys
import sqlalchemy
try:
    engine = sqlalchemy.create_engine(os.environ["MLFLOW_BACKEND_STORE_URI"], connect_args={"connect_timeout": 5})
    engine.connect().close()
except Exception as err:
    print(" ".join(str(getattr(err, "orig", None) or err).split()))
    sys.exit(1)
' 2>&1) || die "MLFLOW_BACKEND_STORE_URI=$(masked "$BACKEND") cannot be opened within 5 s: $why"
}

cmd_start() {
  alive && die "already running (pid $(cat "$PIDFILE"), $URL); scripts/mlflow_server.sh stop first"
  if (exec 3<>"/dev/tcp/$CLIENT_HOST/$PORT") 2>/dev/null; then die "port $PORT is in use (set MLFLOW_PORT)"; fi
  check_database
  mkdir -p "$DIR" "$ARTIFACTS"
  local t0=$SECONDS
  # Own session (setsid), so `stop` can end the server and its workers as one process group.
  # The store's URI goes by the environment (MLflow reads MLFLOW_BACKEND_STORE_URI): on the command
  # line its password would show in every user's `ps`.
  MLFLOW_BACKEND_STORE_URI=$BACKEND setsid "$MLFLOW" server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    --serve-artifacts --artifacts-destination "$ARTIFACTS" \
    >"$DIR/server.log" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  until healthy; do
    alive || { tail -n 30 "$DIR/server.log" >&2; rm -f "$PIDFILE"; die "mlflow server exited (log: $DIR/server.log)"; }
    [ $((SECONDS - t0)) -lt "$START_TIMEOUT_S" ] || { cmd_stop >/dev/null; die "no /health answer in ${START_TIMEOUT_S}s (log: $DIR/server.log)"; }
    sleep 0.5
  done
  echo "MLflow server up in $((SECONDS - t0)) s: $URL (bound to $HOST)"
  echo "  backend store  $(masked "$BACKEND")"
  echo "  artifacts      $ARTIFACTS (served by the server)"
  echo "  use            tracking.uri=$URL"
}

cmd_stop() {
  [ -f "$PIDFILE" ] || { echo "no MLflow server of ours is running"; return 0; }
  local pid
  pid=$(cat "$PIDFILE")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 30); do ps -o pid= -g "$pid" >/dev/null 2>&1 || break; sleep 0.5; done
  if ps -o pid= -g "$pid" >/dev/null 2>&1; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
  rm -f "$PIDFILE"
  echo "MLflow server stopped"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) if alive; then echo "running (pid $(cat "$PIDFILE")): $URL"; healthy && echo "health: OK"; else echo "not running"; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
