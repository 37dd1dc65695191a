#!/usr/bin/env bash
# A private, loopback-only RabbitMQ node for the tests and benchmarks, without
# systemd. It never touches another broker: not the one on 5672, not
# rabbit@localhost, not another run's node.
#
#   scripts/rabbitmq.sh start DIR [--port N] [--owner PID]
#       install Debian's rabbitmq-server if missing, start a node whose every
#       file lives in DIR (missing or empty; `mktemp -d` is a good DIR), on
#       127.0.0.1:N (default: a free port), and wait until it serves AMQP.
#       Writes DIR/node.env (see `env`). With --owner, the node belongs to
#       that process: `reap` stops it once that process is gone.
#   scripts/rabbitmq.sh stop DIR     stop that node (also a frozen one) and its
#                                    epmd, then remove DIR
#   scripts/rabbitmq.sh status DIR   exit 0 when the node runs with its app up
#   scripts/rabbitmq.sh env DIR      its settings as `export KAIROI_TEST_RABBITMQ_*=...`
#   scripts/rabbitmq.sh ctl DIR ARGS...   rabbitmqctl ARGS on that node only
#   scripts/rabbitmq.sh reap         stop the nodes of runs that died (--owner gone)
#
# The node: name kairoi-test-<port>@localhost, its own distribution port and
# its own epmd on a free port (ERL_EPMD_PORT), its own Erlang cookie (HOME is
# DIR), data (DIR/mnesia), logs (DIR/log), pid file (DIR/beam.pid), config
# (DIR/rabbitmq.conf, DIR/enabled_plugins: no plugins) and an empty
# rabbitmq-env.conf, so that nothing of /etc/rabbitmq or /var/lib/rabbitmq is
# used. Run as root, the node runs as the `rabbitmq` user (DIR is chowned to
# it); run as another user, as that user. Installing needs root on Debian.
# The node serves the default guest/guest user (loopback only).
set -euo pipefail

# shellcheck source=scripts/private-node.sh
. "$(dirname "$0")/private-node.sh"
PRIVATE_LOG_NAME=rabbitmq.sh

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
START_TIMEOUT_S="${RABBITMQ_START_TIMEOUT_S:-120}"
# The package's own scripts, not Debian's /usr/sbin wrappers (those cd to
# /var/lib/rabbitmq and use its cookie).
BIN=/usr/lib/rabbitmq/bin

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

install_if_missing() {
    if [ -x "$BIN/rabbitmq-server" ] && [ -x "$BIN/rabbitmqctl" ]; then
        return
    fi
    if command -v rabbitmq-server >/dev/null 2>&1 && command -v rabbitmqctl >/dev/null 2>&1; then
        # Not Debian's layout (e.g. the generic Unix tarball on PATH).
        BIN="$(dirname "$(command -v rabbitmq-server)")"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        private_die "rabbitmq-server is not installed and installing it needs root"
    fi
    private_log "installing rabbitmq-server from Debian's packages"
    # Forbid service starts while the package installs: there is no init system
    # to run the broker, and a postinst that tries would leave a half-started
    # node or fail the install. An existing policy-rc.d is put back afterwards.
    local policy=/usr/sbin/policy-rc.d saved=""
    if [ -e "$policy" ]; then
        saved="$(mktemp)"
        cp -p "$policy" "$saved"
    fi
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q &&
            apt-get install -y -q --no-install-recommends rabbitmq-server
    } || rc=$?
    if [ -n "$saved" ]; then
        mv -f "$saved" "$policy"
    else
        rm -f "$policy"
    fi
    if [ "$rc" != 0 ]; then
        private_die "apt-get failed (exit $rc)"
    fi
}

# The user the node runs as: `rabbitmq` when we are root and it exists.
node_user() {
    if [ "$(id -u)" = 0 ] && id -u rabbitmq >/dev/null 2>&1; then
        echo rabbitmq
    else
        id -un
    fi
}

# Load DIR/node.env into the RABBITMQ_* / ERL_* variables every command of the
# package reads, so that a command can only reach this node.
load() {
    DIR="$1"
    private_claimed "$DIR" || private_die "$DIR: not a node directory of this script"
    [ -s "$DIR/node.env" ] || return 1
    NODE="$(private_env_get "$DIR" KAIROI_TEST_RABBITMQ_NODE)"
    PORT="$(private_env_get "$DIR" KAIROI_TEST_RABBITMQ_PORT)"
    DIST_PORT="$(private_env_get "$DIR" KAIROI_TEST_RABBITMQ_DIST_PORT)"
    EPMD_PORT="$(private_env_get "$DIR" KAIROI_TEST_RABBITMQ_EPMD_PORT)"
    PID_FILE="$DIR/beam.pid"
    export RABBITMQ_NODENAME="$NODE"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$PORT"
    export RABBITMQ_DIST_PORT="$DIST_PORT"
    export ERL_EPMD_PORT="$EPMD_PORT"
    export ERL_EPMD_ADDRESS=127.0.0.1
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export RABBITMQ_PID_FILE="$PID_FILE"
    export RABBITMQ_MNESIA_BASE="$DIR/mnesia"
    export RABBITMQ_LOG_BASE="$DIR/log"
    export RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
    export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
    export HOME="$DIR" # the Erlang cookie: DIR/.erlang.cookie
}

# Run a command of the package as the node's user, in DIR, with load's variables.
as_node() {
    local user
    user="$(node_user)"
    if [ "$user" != "$(id -un)" ]; then
        (cd "$DIR" && runuser -u "$user" -- env HOME="$DIR" "$@")
    else
        (cd "$DIR" && "$@")
    fi
}

ctl() { as_node "$BIN/rabbitmqctl" -n "$NODE" "$@"; }

# The beam's pid, when the pid file names a live process of this node (its
# command line has `-home DIR`: the node name is not on it).
node_pid() {
    local pid
    [ -s "$PID_FILE" ] || return 1
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    private_pid_alive "$pid" "-home $DIR " || return 1
    echo "$pid"
}

app_running() {
    # On RabbitMQ 3.10 `status` needs the app running.
    node_pid >/dev/null && ctl status >/dev/null 2>&1
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
    reap
    install_if_missing
    private_claim "$dir"
    if load "$dir" && node_pid >/dev/null; then
        app_running || private_die "node $NODE (pid $(node_pid)) is up but its app is not running"
        private_log "already running: $NODE on 127.0.0.1:$PORT (pid $(node_pid))"
        return
    fi

    local ports
    # shellcheck disable=SC2086 # no --port: no argument
    ports="$(private_free_ports "$([ -n "$port" ] && echo 2 || echo 3)" $port)" ||
        private_die "cannot use port ${port:-?}"
    # shellcheck disable=SC2086 # split the ports on purpose
    set -- $ports
    if [ -z "$port" ]; then
        port="$1" && shift
    fi
    local node="kairoi-test-$port@localhost"
    cat >"$dir/node.env" <<EOF
KAIROI_TEST_RABBITMQ_DIR=$dir
KAIROI_TEST_RABBITMQ_NODE=$node
KAIROI_TEST_RABBITMQ_HOST=127.0.0.1
KAIROI_TEST_RABBITMQ_PORT=$port
KAIROI_TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:$port/
KAIROI_TEST_RABBITMQ_PID_FILE=$dir/beam.pid
KAIROI_TEST_RABBITMQ_DATA_DIR=$dir/mnesia
KAIROI_TEST_RABBITMQ_LOG_DIR=$dir/log
KAIROI_TEST_RABBITMQ_DIST_PORT=$1
KAIROI_TEST_RABBITMQ_EPMD_PORT=$2
EOF
    [ -z "$owner" ] || private_set_owner "$dir" "$owner"
    load "$dir"
    mkdir -p "$DIR/mnesia" "$DIR/log"
    cat >"$DIR/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$PORT
loopback_users.guest = true
log.console = false
log.file.level = info
EOF
    echo '[].' >"$DIR/enabled_plugins"
    echo '[].' >"$DIR/advanced.config"
    : >"$DIR/rabbitmq-env.conf"
    (umask 077 && od -An -N20 -tx1 /dev/urandom | tr -d ' \n' >"$DIR/.erlang.cookie")
    chmod 400 "$DIR/.erlang.cookie"
    local user
    user="$(node_user)"
    if [ "$user" != "$(id -un)" ]; then
        chown -R "$user:" "$DIR"
        runuser -u "$user" -- test -w "$DIR" ||
            private_die "$DIR: the $user user cannot write there (choose a DIR under /tmp)"
    fi

    private_log "starting $NODE on 127.0.0.1:$PORT (distribution $DIST_PORT, epmd $EPMD_PORT) in $DIR"
    as_node "$BIN/rabbitmq-server" -detached >"$DIR/log/startup.log" 2>&1
    if ! timeout "$START_TIMEOUT_S" "$SELF" ctl "$DIR" wait "$PID_FILE" >>"$DIR/log/startup.log" 2>&1; then
        private_log "$NODE did not start within ${START_TIMEOUT_S}s; its logs:"
        tail -n 30 "$DIR/log/startup.log" "$DIR/log/$NODE.log" >&2 2>/dev/null || true
        stop_node
        exit 1
    fi
    private_log "started $NODE (pid $(node_pid))"
}

# Stop the loaded node and its epmd; every step is safe to repeat.
stop_node() {
    local pid i
    if pid="$(node_pid)"; then
        kill -CONT "$pid" 2>/dev/null || true # a test may have frozen it
        timeout 60 "$SELF" ctl "$DIR" stop "$PID_FILE" >/dev/null 2>&1 || true
        for i in 1 2 3 4 5 6 7 8 9 10; do
            private_pid_alive "$pid" "-home $DIR " || break
            [ "$i" != 5 ] || kill -TERM "$pid" 2>/dev/null || true
            sleep 1
        done
        if private_pid_alive "$pid" "-home $DIR "; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    # The node started its own epmd on its own port: stop it once no node is
    # registered there (if one still is, it is not ours to stop).
    if [ -n "${EPMD_PORT:-}" ] && command -v epmd >/dev/null 2>&1; then
        for i in 1 2 3 4 5; do
            if ! epmd -names >/dev/null 2>&1; then
                break # no epmd there
            fi
            if ! epmd -names 2>/dev/null | grep -q '^name '; then
                epmd -kill >/dev/null 2>&1 || true
                break
            fi
            sleep 1
        done
    fi
}

stop() {
    [ $# = 1 ] || usage
    [ -e "$1" ] || return 0
    private_claimed "$1" || private_die "$1: not a node directory of this script: left alone"
    if load "$1"; then
        private_log "stopping $NODE"
        stop_node
    fi
    private_remove "$1"
    private_log "stopped; removed $1"
}

status() {
    [ $# = 1 ] || usage
    if load "$1" && app_running; then
        echo "running: $NODE on 127.0.0.1:$PORT (pid $(node_pid))"
    else
        echo "not running"
        return 1
    fi
}

reap() {
    local dir
    for dir in "${TMPDIR:-/tmp}"/kairoi-rabbitmq.*; do
        if ! { [ -d "$dir" ] && private_claimed "$dir" && private_orphaned "$dir"; }; then
            continue
        fi
        private_log "$dir: its run is gone; stopping its node"
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
ctl)
    [ $# -ge 3 ] || usage
    load "$2" || private_die "$2: no node there"
    shift 2
    ctl "$@"
    ;;
reap) reap ;;
*) usage ;;
esac
