#!/usr/bin/env bash
# A private, loopback-only PostgreSQL cluster for the tests and benchmarks,
# without systemd or Debian's cluster tools. It never touches another cluster:
# not a developer's on 5432, not /var/lib/postgresql, not another run's.
#
#   scripts/postgres.sh start DIR [--port N] [--owner PID]
#       install Debian's postgresql if initdb/pg_ctl are missing (with no
#       default cluster and no service), create a cluster whose every file
#       lives in DIR (missing or empty; `mktemp -d` is a good DIR), start it on
#       127.0.0.1:N (default: a free port) and wait until it accepts
#       connections. Writes DIR/node.env (see `env`). With --owner, the cluster
#       belongs to that process: `reap` stops it once that process is gone.
#       On a DIR whose cluster was stopped (`ctl DIR stop`), starts it again.
#   scripts/postgres.sh stop DIR     stop that cluster (also a frozen one), remove DIR
#   scripts/postgres.sh status DIR   exit 0 when the cluster accepts connections
#   scripts/postgres.sh env DIR      its settings as `export KAIROI_TEST_POSTGRES_*=...`
#   scripts/postgres.sh psql DIR ARGS...   psql ARGS on that cluster, as postgres
#   scripts/postgres.sh ctl DIR start|stop|restart|status|reload [ARGS...]
#                                    pg_ctl on that cluster only (outage tests)
#   scripts/postgres.sh reap         stop the clusters of runs that died (--owner gone)
#
# The cluster: data in DIR/data (initdb: superuser postgres, trust
# authentication, UTF8, locale C), served on 127.0.0.1:N only, its Unix socket
# in DIR, its log in DIR/log/postgres.log, at most 300 connections. fsync and
# full_page_writes are off: a test run does not outlive an OS crash, and
# synchronous_commit stays on, so a commit the server acknowledged survives a
# crash of the server (`ctl DIR restart -m immediate`). Run as root, the
# cluster runs as the `postgres` user (DIR is chowned to it; the user is created
# if missing); run as another user, as that user. Installing needs root on
# Debian. The caller's PG* variables are ignored.
set -euo pipefail

# shellcheck source=scripts/private-node.sh
. "$(dirname "$0")/private-node.sh"
PRIVATE_LOG_NAME=postgres.sh

START_TIMEOUT_S="${POSTGRES_START_TIMEOUT_S:-60}"
# A Unix socket path has at most 107 bytes: DIR/.s.PGSQL.NNNNN.lock must fit.
MAX_DIR_LENGTH=80
BIN=""
# PGHOST, PGPORT, PGDATA, PGOPTIONS, PGSERVICE... could point a command at
# another cluster: every command here names its cluster explicitly.
unset "${!PG@}"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# BIN: the newest Debian server (/usr/lib/postgresql/<major>/bin), else
# initdb and pg_ctl on PATH.
find_bin() {
    local dir
    while read -r dir; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            BIN="$dir"
            return
        fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
    if command -v pg_ctl >/dev/null 2>&1; then
        dir="$(dirname "$(command -v pg_ctl)")"
        if [ -x "$dir/initdb" ]; then
            BIN="$dir"
            return
        fi
    fi
    return 1
}

install_if_missing() {
    find_bin && return
    if [ "$(id -u)" != 0 ]; then
        private_die "PostgreSQL (initdb, pg_ctl) is not installed and installing it needs root"
    fi
    private_log "installing postgresql from Debian's packages"
    # Forbid service starts while the package installs (no init system here;
    # an existing policy-rc.d is put back afterwards), and tell
    # postgresql-common not to create the default cluster (main, on 5432): an
    # existing createcluster.conf is put back afterwards, a new one stays.
    local policy=/usr/sbin/policy-rc.d saved_policy=""
    local conf=/etc/postgresql-common/createcluster.conf saved_conf=""
    if [ -e "$policy" ]; then
        saved_policy="$(mktemp)"
        cp -p "$policy" "$saved_policy"
    fi
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    mkdir -p "$(dirname "$conf")"
    if [ -e "$conf" ]; then
        saved_conf="$(mktemp)"
        cp -p "$conf" "$saved_conf"
        sed -i 's/^[[:space:]]*create_main_cluster[[:space:]]*=/#&/' "$conf"
    fi
    echo 'create_main_cluster = false' >>"$conf"
    local rc=0
    {
        # ucf keeps our createcluster.conf instead of asking about it.
        export DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1
        apt-get update -q &&
            apt-get install -y -q --no-install-recommends \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold postgresql
    } || rc=$?
    if [ -n "$saved_policy" ]; then
        mv -f "$saved_policy" "$policy"
    else
        rm -f "$policy"
    fi
    if [ -n "$saved_conf" ]; then
        mv -f "$saved_conf" "$conf"
    fi
    if [ "$rc" != 0 ]; then
        private_die "apt-get failed (exit $rc)"
    fi
    find_bin || private_die "postgresql is installed but no initdb and pg_ctl were found"
}

# The user the cluster runs as: PostgreSQL refuses to run as root.
node_user() {
    if [ "$(id -u)" = 0 ]; then
        echo postgres
    else
        id -un
    fi
}

ensure_user() {
    if [ "$(id -u)" != 0 ] || id -u postgres >/dev/null 2>&1; then
        return
    fi
    private_log "creating the system user postgres"
    useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home \
        --shell /bin/bash postgres
}

# A program of the cluster's installation (psql and pg_isready may be elsewhere).
tool() {
    if [ -x "$BIN/$1" ]; then
        echo "$BIN/$1"
    else
        command -v "$1" || private_die "$1: not found"
    fi
}

# Load DIR/node.env: the cluster's port, data directory and binaries.
load() {
    DIR="${1%/}"
    private_claimed "$DIR" || private_die "$DIR: not a cluster directory of this script"
    [ -s "$DIR/node.env" ] || return 1
    PORT="$(private_env_get "$DIR" KAIROI_TEST_POSTGRES_PORT)"
    DATA="$(private_env_get "$DIR" KAIROI_TEST_POSTGRES_DATA)"
    BIN="$(private_env_get "$DIR" KAIROI_TEST_POSTGRES_BIN)"
    LOG="$DIR/log/postgres.log"
    [ "$DATA" = "$DIR/data" ] || private_die "$DIR/node.env: the data directory is not $DIR/data"
}

# Run a program of the installation as the cluster's user, in DIR (the caller's
# directory may be closed to that user).
as_node() {
    local user
    user="$(node_user)"
    if [ "$user" != "$(id -un)" ]; then
        (cd "$DIR" && runuser -u "$user" -- "$@")
    else
        (cd "$DIR" && "$@")
    fi
}

pg_ctl_() { as_node "$BIN/pg_ctl" "$@" -D "$DATA" -l "$LOG"; }

# The postmaster's pid, when DATA/postmaster.pid names a live postgres process
# started on DATA (so a stale or reused pid is never taken for it).
postmaster_pid() {
    local pid
    [ -s "$DATA/postmaster.pid" ] || return 1
    pid="$(head -n 1 "$DATA/postmaster.pid" | tr -dc '0-9')"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ] || return 1
    private_pid_alive "$pid" " -D $DATA " || return 1
    echo "$pid"
}

ready() {
    "$(tool pg_isready)" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -t 5
}

start() {
    local dir="" port="" owner=""
    while [ $# -gt 0 ]; do
        case "$1" in
        --port) port="$2" && shift 2 ;;
        --owner) owner="$2" && shift 2 ;;
        -*) usage ;;
        *)
            [ -z "$dir" ] || usage
            dir="$1" && shift
            ;;
        esac
    done
    [ -n "$dir" ] || usage
    dir="${dir%/}"
    [ "${#dir}" -le "$MAX_DIR_LENGTH" ] ||
        private_die "$dir: a path of at most $MAX_DIR_LENGTH characters, please (its socket lives there)"
    reap
    install_if_missing
    ensure_user
    private_claim "$dir"
    if load "$dir" && [ -f "$DATA/PG_VERSION" ]; then
        if postmaster_pid >/dev/null; then
            ready || private_die "the cluster in $DIR (pid $(postmaster_pid)) runs but does not accept connections"
            private_log "already running: 127.0.0.1:$PORT (pid $(postmaster_pid))"
            return
        fi
        [ -z "$port" ] || [ "$port" = "$PORT" ] || private_die "$DIR holds a cluster for port $PORT, not $port"
        private_free_ports 0 "$PORT" >/dev/null || private_die "cannot use port $PORT"
        [ -z "$owner" ] || private_set_owner "$DIR" "$owner"
        start_cluster
        return
    fi

    local ports
    # shellcheck disable=SC2086 # no --port: no argument
    ports="$(private_free_ports "$([ -n "$port" ] && echo 0 || echo 1)" $port)" ||
        private_die "cannot use port ${port:-?}"
    port="${port:-$ports}"
    find_bin
    cat >"$dir/node.env" <<EOF
KAIROI_TEST_POSTGRES_DIR=$dir
KAIROI_TEST_POSTGRES_HOST=127.0.0.1
KAIROI_TEST_POSTGRES_PORT=$port
KAIROI_TEST_POSTGRES_DSN=postgresql://postgres@127.0.0.1:$port/postgres
KAIROI_TEST_POSTGRES_BIN=$BIN
KAIROI_TEST_POSTGRES_DATA=$dir/data
KAIROI_TEST_POSTGRES_LOG_DIR=$dir/log
EOF
    [ -z "$owner" ] || private_set_owner "$dir" "$owner"
    load "$dir"
    rm -rf "$DATA" # what a failed initdb may have left
    mkdir -p "$DIR/log"
    local user
    user="$(node_user)"
    if [ "$user" != "$(id -un)" ]; then
        chown -R "$user:" "$DIR"
        runuser -u "$user" -- test -w "$DIR" ||
            private_die "$DIR: the $user user cannot write there (choose a DIR under /tmp)"
    fi
    # --no-sync: see fsync above.
    if ! as_node "$BIN/initdb" -D "$DATA" --auth=trust --username=postgres -E UTF8 \
        --locale=C --no-sync >"$DIR/log/initdb.log" 2>&1; then
        tail -n 20 "$DIR/log/initdb.log" >&2
        private_die "initdb failed"
    fi
    cat >>"$DATA/postgresql.conf" <<EOF

# scripts/postgres.sh: a private test cluster, loopback only, every file in $DIR
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
max_connections = 300
fsync = off
full_page_writes = off
synchronous_commit = on
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    cat >"$DATA/pg_hba.conf" <<EOF
# scripts/postgres.sh: loopback only, no password
local all all trust
host all all 127.0.0.1/32 trust
EOF
    start_cluster
}

start_cluster() {
    private_log "starting PostgreSQL $("$BIN/pg_ctl" --version | sed 's/^[^)]*) //') on 127.0.0.1:$PORT in $DIR"
    local i ok=""
    if pg_ctl_ start -w -t "$START_TIMEOUT_S" >>"$DIR/log/startup.log" 2>&1; then
        for i in $(seq 50); do
            if ready; then
                ok=1 && break
            fi
            [ "$i" = 50 ] || sleep 0.2
        done
    fi
    if [ -z "$ok" ]; then
        private_log "the cluster did not start within ${START_TIMEOUT_S}s; its log:"
        tail -n 30 "$DIR/log/startup.log" "$LOG" >&2 2>/dev/null || true
        stop_cluster
        exit 1
    fi
    private_log "started (pid $(postmaster_pid))"
}

# Stop the loaded cluster: a fast shutdown, an immediate one after 10 s, SIGKILL
# after 10 s more. Every signal goes to the checked postmaster or its children.
stop_cluster() {
    local pid children
    pid="$(postmaster_pid)" || return 0
    children="$(ps -o pid= --ppid "$pid" || true)"
    # shellcheck disable=SC2086 # split the pids on purpose
    kill -CONT "$pid" $children 2>/dev/null || true # a test may have frozen it
    pg_ctl_ stop -m fast -w -t 10 >/dev/null 2>&1 ||
        pg_ctl_ stop -m immediate -w -t 10 >/dev/null 2>&1 || true
    if private_pid_alive "$pid" " -D $DATA "; then
        private_log "the postmaster (pid $pid) did not stop: killing it"
        children="$(ps -o pid= --ppid "$pid" || true)"
        # shellcheck disable=SC2086
        kill -KILL "$pid" $children 2>/dev/null || true
    fi
}

stop() {
    [ $# = 1 ] || usage
    [ -e "$1" ] || return 0
    if [ -d "$1" ] && [ -z "$(ls -A "$1")" ]; then
        rmdir "$1" # made for a start that failed before claiming it
        return 0
    fi
    private_claimed "$1" || private_die "$1: not a cluster directory of this script: left alone"
    if load "$1"; then
        private_log "stopping the cluster on 127.0.0.1:$PORT"
        stop_cluster
    fi
    private_remove "$1"
    private_log "stopped; removed $1"
}

status() {
    [ $# = 1 ] || usage
    if load "$1" && postmaster_pid >/dev/null && ready; then
        echo "running: PostgreSQL on 127.0.0.1:$PORT (pid $(postmaster_pid), data $DATA)"
    else
        echo "not running"
        return 1
    fi
}

reap() {
    local dir
    for dir in "${TMPDIR:-/tmp}"/kairoi-postgres.*; do
        if ! { [ -d "$dir" ] && private_claimed "$dir" && private_orphaned "$dir"; }; then
            continue
        fi
        private_log "$dir: its run is gone; stopping its cluster"
        (stop "$dir") || true
    done
}

case "${1:-}" in
start) shift && start "$@" ;;
stop) shift && stop "$@" ;;
status) shift && status "$@" ;;
env)
    [ $# = 2 ] || usage
    private_env_print "$2"
    ;;
psql)
    [ $# -ge 2 ] || usage
    load "$2" || private_die "$2: no cluster there"
    shift 2
    PGDATABASE=postgres PGUSER=postgres exec "$(tool psql)" -h 127.0.0.1 -p "$PORT" "$@"
    ;;
ctl)
    [ $# -ge 3 ] || usage
    load "$2" || private_die "$2: no cluster there"
    case "$3" in
    start | stop | restart | status | reload) ;;
    *) private_die "ctl: $3: only start, stop, restart, status and reload" ;;
    esac
    shift 2
    pg_ctl_ "$@"
    ;;
reap) reap ;;
*) usage ;;
esac
