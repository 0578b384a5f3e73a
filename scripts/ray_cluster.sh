#!/usr/bin/env bash
# A two-node Ray cluster on this machine: a head node and one worker node, each its own raylet with
# its own CPUs, as on two hosts. For trying cluster runs before renting machines, and for
# tests/test_cluster_multinode.py.
#
#   scripts/ray_cluster.sh start         start both nodes, print the address, dashboard and client env
#   scripts/ray_cluster.sh stop          stop both nodes (only the processes this script started)
#   scripts/ray_cluster.sh stop-worker   kill the worker node's raylet (SIGKILL), as if its host died
#   scripts/ray_cluster.sh status        which nodes run, and `ray status`
#   scripts/ray_cluster.sh env           the client env, for: eval "$(scripts/ray_cluster.sh env)"
#
# Settings (environment):
#   RAY_HEAD_PORT=6390 RAY_DASHBOARD_PORT=8266   GCS and dashboard (jobs API) ports; the Ray client
#                                                server takes RAY_HEAD_PORT+1
#   RAY_HEAD_CPUS=1 RAY_WORKER_CPUS=1            CPUs each node offers to trials
#   RAY_HEAD_GPUS=0 RAY_WORKER_GPUS=0            GPUs each node offers
#   RAY_OBJECT_STORE_BYTES=268435456             object store per node (trials pass small dicts)
#   RAY_CLUSTER_DIR=runs/ray-cluster             pids, logs of `ray start`, node ids, env.sh
#   RAY_CLUSTER_TMP=/tmp/ray-initstudy-<port>    Ray's temp dirs (sockets, session logs, unpacked
#                                                working dirs): <tmp>/head and <tmp>/worker. One per
#                                                node, as on two hosts: with a shared one the worker
#                                                node's runtime-env agent deletes and re-unpacks the
#                                                job's working dir under the running driver (its cwd
#                                                vanishes: "[Errno 2] No such file or directory").
#                                                Not /tmp/ray, so a plain ray.init() elsewhere on
#                                                this machine never joins this cluster
#   RAY=<project>/.venv/bin/ray                  the ray CLI (its Python runs drivers and workers)
#
# Token authentication: the cluster runs with RAY_AUTH_MODE=token. The token is RAY_AUTH_TOKEN if
# set, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (generated when missing). Clients
# (ray job submit, ray status, a driver with cluster.address=...) need RAY_AUTH_MODE=token and the
# same token; `env` prints what to export.
#
# Each node is a `ray start --block` process in its own session (setsid): stopping a node sends
# SIGTERM to that process, which stops its raylet, agents and workers. Nothing else is touched,
# unlike `ray stop`, which kills every Ray process of this user on the machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HEAD_PORT=${RAY_HEAD_PORT:-6390}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8266}
HEAD_CPUS=${RAY_HEAD_CPUS:-1}
WORKER_CPUS=${RAY_WORKER_CPUS:-1}
HEAD_GPUS=${RAY_HEAD_GPUS:-0}
WORKER_GPUS=${RAY_WORKER_GPUS:-0}
OBJECT_STORE_BYTES=${RAY_OBJECT_STORE_BYTES:-268435456}
DIR=${RAY_CLUSTER_DIR:-$ROOT/runs/ray-cluster}
TMP=${RAY_CLUSTER_TMP:-/tmp/ray-initstudy-$HEAD_PORT}
if [ -z "${RAY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/ray" ]; then RAY=$ROOT/.venv/bin/ray; else RAY=$(command -v ray || true); fi
fi
[ -n "$RAY" ] || { echo "error: no ray CLI (run scripts/setup.sh, or set RAY=/path/to/ray)" >&2; exit 2; }
PYTHON=$(dirname "$RAY")/python
[ -x "$PYTHON" ] || PYTHON=python3
DASHBOARD=http://127.0.0.1:$DASHBOARD_PORT
START_TIMEOUT_S=${RAY_START_TIMEOUT_S:-90}

export RAY_AUTH_MODE=token
# Jobs' entrypoints (`python -m pipeline ...`) find the Python that runs Ray's workers first.
PATH=$(dirname "$RAY"):$PATH

die() { echo "error: $*" >&2; exit 1; }
alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_token() {
  [ -n "${RAY_AUTH_TOKEN:-}" ] && return
  if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    [ -s "$RAY_AUTH_TOKEN_PATH" ] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
    return
  fi
  [ -s "$HOME/.ray/auth_token" ] || "$RAY" get-auth-token --generate >/dev/null
}

# start_node NAME ARGS...: `ray start --block ARGS` in its own session; wait until it is up.
start_node() {
  local name=$1; shift
  setsid "$RAY" start --block --temp-dir="$TMP/$name" --disable-usage-stats \
    --object-store-memory="$OBJECT_STORE_BYTES" --dashboard-agent-listen-port=0 "$@" \
    >"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
  local waited=0
  until grep -q "Ray runtime started" "$DIR/$name.log"; do
    if ! alive "$name"; then tail -n 30 "$DIR/$name.log" >&2; die "the $name node did not start (log: $DIR/$name.log)"; fi
    [ "$waited" -lt "$START_TIMEOUT_S" ] || { stop_node "$name"; die "the $name node did not start in ${START_TIMEOUT_S}s"; }
    sleep 1; waited=$((waited + 1))
  done
  # The raylet is the node: killing it is how `stop-worker` makes the node die like a lost host.
  ps -o pid=,args= --ppid "$(cat "$DIR/$name.pid")" | awk '$2 ~ /\/raylet$/ {print $1}' >"$DIR/$name.raylet.pid"
}

# stop_node NAME: SIGTERM to its `ray start --block` (it stops its own processes), then SIGKILL to
# the session it leads if anything is left after 20 s.
stop_node() {
  local name=$1 pid
  [ -f "$DIR/$name.pid" ] || return 0
  pid=$(cat "$DIR/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  if ps -o pid= -g "$pid" >/dev/null 2>&1; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
  rm -f "$DIR/$name.pid" "$DIR/$name.raylet.pid"
}

# Node ids from the state API: head first, then the worker (trials tag their runs with them).
write_node_ids() {
  local waited=0
  until "$RAY" list nodes --address="$DASHBOARD" --format=json 2>/dev/null | "$PYTHON" -c '
import json, sys
nodes = [n for n in json.load(sys.stdin) if n["state"] == "ALIVE"]
head = [n["node_id"] for n in nodes if n["is_head_node"]]
workers = [n["node_id"] for n in nodes if not n["is_head_node"]]
if len(head) != 1 or len(workers) != 1:
    sys.exit(1)
open(sys.argv[1], "w").write(head[0] + "\n")
open(sys.argv[2], "w").write(workers[0] + "\n")
' "$DIR/head.node_id" "$DIR/worker.node_id"; do
    [ "$waited" -lt "$START_TIMEOUT_S" ] || die "the cluster did not show two alive nodes in ${START_TIMEOUT_S}s"
    sleep 1; waited=$((waited + 1))
  done
}

client_env() {
  echo "export RAY_AUTH_MODE=token"
  [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] || echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  echo "export RAY_ADDRESS=$(cat "$TMP/head/ray_current_cluster")"  # GCS: drivers, ray status
  echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD"              # jobs API: ray job submit/logs/stop
}

cmd_start() {
  if alive head || alive worker; then die "already running (scripts/ray_cluster.sh stop first)"; fi
  for port in "$HEAD_PORT" "$((HEAD_PORT + 1))" "$DASHBOARD_PORT"; do
    if port_busy "$port"; then die "port $port is in use (set RAY_HEAD_PORT / RAY_DASHBOARD_PORT)"; fi
  done
  ensure_token
  mkdir -p "$DIR"
  rm -rf "$TMP/head" "$TMP/worker"  # the previous run's sessions (no node of ours runs)
  local t0=$SECONDS
  start_node head --head --node-ip-address=127.0.0.1 --port="$HEAD_PORT" --ray-client-server-port="$((HEAD_PORT + 1))" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --num-cpus="$HEAD_CPUS" --num-gpus="$HEAD_GPUS"
  start_node worker --address="127.0.0.1:$HEAD_PORT" --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS" \
    || { stop_node head; exit 1; }
  write_node_ids || { stop_node worker; stop_node head; exit 1; }
  client_env >"$DIR/env.sh"
  echo "Ray cluster up in $((SECONDS - t0)) s: head ($HEAD_CPUS CPU, $HEAD_GPUS GPU) + worker ($WORKER_CPUS CPU, $WORKER_GPUS GPU)"
  echo "  address    $(cat "$TMP/head/ray_current_cluster")   (Ray binds the host's IP, not the loopback)"
  echo "  dashboard  $DASHBOARD"
  echo "  head node  $(cat "$DIR/head.node_id")"
  echo "  worker     $(cat "$DIR/worker.node_id")"
  echo "  client env (also in $DIR/env.sh):"
  sed 's/^/    /' "$DIR/env.sh"
}

cmd_stop() {
  stop_node worker
  stop_node head
  echo "Ray cluster stopped (session logs stay in $TMP until the next start)"
}

cmd_stop_worker() {
  alive worker || die "no worker node of ours is running"
  local raylet
  raylet=$(cat "$DIR/worker.raylet.pid")
  kill -KILL "$raylet" 2>/dev/null || true
  # Its `ray start --block` sees the raylet die, kills the node's other processes and exits.
  for _ in $(seq 40); do alive worker || break; sleep 0.5; done
  stop_node worker
  echo "worker node $(cat "$DIR/worker.node_id") killed (raylet pid $raylet)"
}

cmd_status() {
  for name in head worker; do
    if alive "$name"; then echo "$name: running (pid $(cat "$DIR/$name.pid"), node $(cat "$DIR/$name.node_id" 2>/dev/null))"
    else echo "$name: not running"; fi
  done
  if alive head; then RAY_ADDRESS=$(cat "$TMP/head/ray_current_cluster") "$RAY" status; fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  stop-worker) cmd_stop_worker ;;
  status) cmd_status ;;
  env) alive head || die "not running"; client_env ;;
  *) echo "usage: $0 start|stop|stop-worker|status|env" >&2; exit 2 ;;
esac
