#!/usr/bin/env bash
# A throw-away PostgreSQL cluster on 127.0.0.1 for the multi-worker sweep and MLflow-store tests.
#
#   .ci/postgres.sh start        start it; prints the export lines (eval "$(.ci/postgres.sh start)")
#   .ci/postgres.sh stop [DIR]   stop it and delete its data (DIR defaults to $SVLIB_PG_DIR)
#   .ci/postgres.sh run CMD...   start, run CMD with the variables exported, stop at exit (trap)
#
# Databases: `svlib` (Optuna storage, SVLIB_TEST_POSTGRES_URL) and `mlflow` (tracking store,
# SVLIB_TEST_MLFLOW_PG_URL), owned by user `svlib`. Installs Debian's postgresql when it is missing.
# Everything goes to stderr except the export lines, so `eval` sees only those.
set -euo pipefail

PG_USER=svlib
PG_PASS=svlib-ci
FIRST_PORT=${SVLIB_PG_PORT:-55432}

log() { echo "postgres.sh: $*" >&2; }

pg_bindir() {
    local initdb
    initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$initdb" ]; then
        if [ "$(id -u)" != 0 ]; then
            log "PostgreSQL is not installed and this is not root: apt-get install -y postgresql"
            return 1
        fi
        log "installing Debian postgresql"
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql >&2
        initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)
    fi
    dirname "$initdb"
}

# initdb and postgres refuse to run as root: run them as the `postgres` user the package created.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    local bin dir port started=""
    bin=$(pg_bindir)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/svlib-pg.XXXXXX")
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
    # Another job may hold the port (or grab it between our check and the bind): try the next ones.
    for port in $(seq "$FIRST_PORT" $((FIRST_PORT + 19))); do
        port_busy "$port" && continue
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
                -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off" start >&2; then
            started=$port
            break
        fi
    done
    if [ -z "$started" ]; then
        log "could not start PostgreSQL on ports $FIRST_PORT..$((FIRST_PORT + 19)); log:"
        tail -n 30 "$dir/server.log" >&2 || true
        stop "$dir"
        return 1
    fi
    as_owner "$bin/psql" -h "$dir" -p "$started" -U postgres -d postgres -v ON_ERROR_STOP=1 -q >&2 <<SQL
CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASS';
CREATE DATABASE svlib OWNER $PG_USER;
CREATE DATABASE mlflow OWNER $PG_USER;
SQL
    log "PostgreSQL $(basename "$(dirname "$bin")") on 127.0.0.1:$started, data in $dir"
    echo "export SVLIB_PG_DIR=$dir"
    echo "export SVLIB_TEST_POSTGRES_URL=postgresql+psycopg2://$PG_USER:$PG_PASS@127.0.0.1:$started/svlib"
    echo "export SVLIB_TEST_MLFLOW_PG_URL=postgresql+psycopg2://$PG_USER:$PG_PASS@127.0.0.1:$started/mlflow"
}

stop() {
    local dir=${1:-${SVLIB_PG_DIR:-}} bin
    if [ -z "$dir" ] || [ ! -d "$dir" ]; then
        log "stop: no cluster folder (give DIR or set SVLIB_PG_DIR)"
        return 0
    fi
    case "$(basename "$dir")" in svlib-pg.*) ;; *) log "stop: $dir is not a folder this script made"; return 1 ;; esac
    bin=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >&2 || log "pg_ctl stop failed"
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    run)
        shift
        [ $# -gt 0 ] || { log "run: give a command"; exit 2; }
        env_lines=$(start)  # an assignment, so a failed start stops here (set -e)
        eval "$env_lines"
        trap 'stop "$SVLIB_PG_DIR"' EXIT
        "$@"
        ;;
    *) echo "usage: $0 start | stop [DIR] | run CMD..." >&2; exit 2 ;;
esac
