#!/usr/bin/env bash
# A PostgreSQL server for a team's store: MLflow's backend store and Optuna's storage in one
# database server (docs/cluster.md, "Team deployment"). Debian's PostgreSQL 15, its own data
# directory, password authentication, the loopback only unless told otherwise.
#
#   scripts/postgres.sh install   apt-get install Debian's postgresql-15 if it is missing (as root)
#   scripts/postgres.sh start     install if missing and root; create the cluster on first use; start
#                                 it; make sure the user and the databases exist; print the URLs
#   scripts/postgres.sh stop      stop the server (pg_ctl stop -m fast)
#   scripts/postgres.sh status
#   scripts/postgres.sh url       the SQLAlchemy URLs, one a line: the mlflow database, then optuna
#   scripts/postgres.sh url --no-password   the same without the password, for clients that read
#                                 it from libpq's password file: export PGPASSFILE=$POSTGRES_DIR/pgpass
#
# A password inside study.storage is recorded with the study (its parent run's storage param and
# command tag, every trial's config.yaml): give studies the URL without it, and PGPASSFILE.
#
# Settings (environment):
#   POSTGRES_DIR=runs/postgres   data/ (the cluster, its log server.log) and the password file
#   POSTGRES_HOST=127.0.0.1      listen address; another host's clients also need POSTGRES_CLIENTS
#   POSTGRES_CLIENTS=127.0.0.1/32  addresses (CIDR, space-separated) allowed to log in, by password
#   POSTGRES_PORT=5433           5433, not 5432: a system PostgreSQL may hold the standard port
#   POSTGRES_USER=initstudy      the login of MLflow and Optuna; owns both databases, no superuser
#   POSTGRES_PASSWORD            its password; unset: generated once into $POSTGRES_DIR/password
#                                (mode 0600). Set, it replaces the stored one at the next start.
#                                `start` also writes it to $POSTGRES_DIR/pgpass (mode 0600), in the
#                                format of libpq's password file (~/.pgpass)
#   PG_VERSION=15, PG_BIN=/usr/lib/postgresql/$PG_VERSION/bin
#   POSTGRES_OS_USER=postgres    who runs the server when this script runs as root: PostgreSQL
#                                refuses to run as root (Debian's package creates this user)
#
# The cluster's superuser is the OS user that runs the server, reachable only through the Unix
# socket in the data directory (peer authentication): no superuser login over TCP. Exit status 3
# means PostgreSQL is not installed and this script could not install it (not root, no apt).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${POSTGRES_DIR:-$ROOT/runs/postgres}
DATA=$DIR/data
HOST=${POSTGRES_HOST:-127.0.0.1}
CLIENTS=${POSTGRES_CLIENTS:-127.0.0.1/32}
PORT=${POSTGRES_PORT:-5433}
DB_USER=${POSTGRES_USER:-initstudy}
PG_VERSION=${PG_VERSION:-15}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/$PG_VERSION/bin}
PASSWORD_FILE=$DIR/password
DATABASES="mlflow optuna"
# Clients connect to the loopback when the server listens on every interface.
CLIENT_HOST=$HOST
case "$HOST" in 0.0.0.0|'*'|::) CLIENT_HOST=127.0.0.1 ;; esac
if [ "$(id -u)" -eq 0 ]; then OS_USER=${POSTGRES_OS_USER:-postgres}; else OS_USER=$(id -un); fi

die() { echo "error: $1" >&2; exit "${2:-1}"; }

# Run a PostgreSQL program as the server's OS user, from / (a private cwd would stop it).
as_server() {
  if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u "$OS_USER" -- "$@"); else "$@"; fi
}

installed() { [ -x "$PG_BIN/pg_ctl" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/psql" ]; }

cmd_install() {
  installed && { echo "PostgreSQL $PG_VERSION is installed ($PG_BIN)"; return 0; }
  [ "$(id -u)" -eq 0 ] || die "PostgreSQL $PG_VERSION is not installed ($PG_BIN/pg_ctl missing); install it with: sudo apt-get install -y postgresql-$PG_VERSION" 3
  command -v apt-get >/dev/null 2>&1 || die "PostgreSQL $PG_VERSION is not installed and there is no apt-get; install it and set PG_BIN" 3
  export DEBIAN_FRONTEND=noninteractive
  local failed="apt-get could not install postgresql-$PG_VERSION (see above)"
  apt-get update -q || die "$failed" 3
  apt-get install -y -q --no-install-recommends postgresql-common || die "$failed" 3
  # No default cluster: Debian would otherwise create (and, with an init system, start) one on 5432.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/initstudy.conf
  apt-get install -y -q --no-install-recommends "postgresql-$PG_VERSION" || die "$failed" 3
  installed || die "apt-get installed postgresql-$PG_VERSION but $PG_BIN/pg_ctl is missing"
  echo "installed: $("$PG_BIN/postgres" --version)"
}

password() {
  if [ -n "${POSTGRES_PASSWORD:-}" ]; then printf '%s' "$POSTGRES_PASSWORD"; return; fi
  if [ ! -s "$PASSWORD_FILE" ]; then
    mkdir -p "$DIR"
    # Letters and digits only: the password goes into URLs unescaped.
    (umask 077 && head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24 >"$PASSWORD_FILE")
  fi
  chmod 600 "$PASSWORD_FILE"
  cat "$PASSWORD_FILE"
}

# Percent-encode for the userinfo part of a URL (a POSTGRES_PASSWORD may hold any character).
urlencode() {
  local s=$1 out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case "$c" in [A-Za-z0-9._~-]) out+=$c ;; *) out+=$(printf '%%%02X' "'$c") ;; esac
  done
  printf '%s' "$out"
}

cmd_url() {
  local login=$DB_USER
  [ "${1:-}" = --no-password ] || login+=":$(urlencode "$(password)")"
  for db in $DATABASES; do echo "postgresql+psycopg2://$login@$CLIENT_HOST:$PORT/$db"; done
}

# libpq's password file: clients given PGPASSFILE connect with URLs that hold no password.
write_pgpass() {
  local pw
  pw=$(password)
  pw=${pw//\\/\\\\}
  pw=${pw//:/\\:}
  (umask 077 && echo "*:$PORT:*:$DB_USER:$pw" >"$DIR/pgpass")
  chmod 600 "$DIR/pgpass"
}

running() { [ -f "$DATA/postmaster.pid" ] && as_server "$PG_BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }

# The data directory, created once by initdb and owned by the server's OS user.
init_cluster() {
  [ -f "$DATA/PG_VERSION" ] && return 0
  mkdir -p "$DATA"
  if [ "$(id -u)" -eq 0 ]; then
    id "$OS_USER" >/dev/null 2>&1 || die "no OS user $OS_USER to run PostgreSQL as (set POSTGRES_OS_USER)"
    chown "$OS_USER:" "$DATA"
    runuser -u "$OS_USER" -- test -x "$DIR" ||
      die "$OS_USER cannot reach $DATA (a folder above it is private); set POSTGRES_DIR to a folder it can reach"
  fi
  chmod 700 "$DATA"
  as_server "$PG_BIN/initdb" -D "$DATA" -U "$OS_USER" -E UTF8 --no-locale \
    --auth-local=peer --auth-host=reject >"$DIR/initdb.log" 2>&1 ||
    { tail -n 20 "$DIR/initdb.log" >&2; die "initdb failed (log: $DIR/initdb.log)"; }
}

# Who may log in, written at every start so POSTGRES_CLIENTS applies: the superuser through the
# socket as its own OS user, the study user over TCP by password (SCRAM), to its two databases only.
write_hba() {
  {
    echo "# Written by scripts/postgres.sh at every start."
    echo "local all $OS_USER peer"
    for net in $CLIENTS; do echo "host ${DATABASES// /,} $DB_USER $net scram-sha-256"; done
  } | as_server tee "$DATA/pg_hba.conf" >/dev/null
}

# The study user (its password set from POSTGRES_PASSWORD or the file) and its databases.
ensure_databases() {
  local pw sql
  pw=$(password)
  sql="SELECT format('CREATE ROLE %I LOGIN', '$DB_USER') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') \\gexec
ALTER ROLE \"$DB_USER\" PASSWORD '${pw//\'/\'\'}';"
  for db in $DATABASES; do
    sql+="
SELECT 'CREATE DATABASE $db OWNER \"$DB_USER\"' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db') \\gexec"
  done
  # Through stdin, so the password never appears on a command line (ps).
  as_server "$PG_BIN/psql" -h "$DATA" -p "$PORT" -U "$OS_USER" -d postgres -v ON_ERROR_STOP=1 -qAt <<<"$sql" >/dev/null
}

cmd_start() {
  installed || cmd_install
  if running; then
    echo "PostgreSQL already running ($DATA)"
  else
    if (exec 3<>"/dev/tcp/$CLIENT_HOST/$PORT") 2>/dev/null; then die "port $PORT is in use (set POSTGRES_PORT)"; fi
    local t0=$SECONDS
    init_cluster
    write_hba
    # The socket lives in the data directory: only the server's OS user can use it.
    as_server "$PG_BIN/pg_ctl" start -D "$DATA" -l "$DATA/server.log" -w -t 60 \
      -o "-c listen_addresses='$HOST' -p $PORT -c unix_socket_directories='$DATA' -c password_encryption=scram-sha-256" \
      >/dev/null || { tail -n 20 "$DATA/server.log" >&2; die "PostgreSQL did not start (log: $DATA/server.log)"; }
    echo "PostgreSQL $PG_VERSION up in $((SECONDS - t0)) s on $HOST:$PORT (data: $DATA)"
  fi
  ensure_databases
  write_pgpass
  local source=$PASSWORD_FILE
  [ -z "${POSTGRES_PASSWORD:-}" ] || source="\$POSTGRES_PASSWORD"
  echo "  user      $DB_USER (password: $source; libpq's password file: $DIR/pgpass)"
  echo "  MLflow    MLFLOW_BACKEND_STORE_URI=\$(scripts/postgres.sh url | head -1) scripts/mlflow_server.sh start"
  echo "  Optuna    PGPASSFILE=$DIR/pgpass and study.storage=\$(scripts/postgres.sh url --no-password | tail -1)"
}

cmd_stop() {
  if ! running; then echo "PostgreSQL is not running ($DATA)"; return 0; fi
  as_server "$PG_BIN/pg_ctl" stop -D "$DATA" -m fast -w >/dev/null
  echo "PostgreSQL stopped"
}

cmd_status() {
  if running; then echo "running on $HOST:$PORT ($DATA)"; else echo "not running ($DATA)"; fi
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) if installed; then cmd_stop; else echo "PostgreSQL is not installed"; fi ;;
  status) if installed; then cmd_status; else echo "PostgreSQL is not installed"; fi ;;
  url) cmd_url "${2:-}" ;;
  *) echo "usage: $0 install|start|stop|status|url [--no-password]" >&2; exit 2 ;;
esac
