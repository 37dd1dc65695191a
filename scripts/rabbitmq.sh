#!/usr/bin/env bash
# A loopback-only RabbitMQ for the amqp runner's tests, without systemd.
#
#   scripts/rabbitmq.sh start    install Debian's rabbitmq-server if missing, start it, wait
#   scripts/rabbitmq.sh stop     stop the node, then the epmd it left behind
#   scripts/rabbitmq.sh status   exit 0 when the node is up and its app running
#
# Every command is idempotent. Needs root on Debian (apt-get, and the package's
# wrapper scripts switch to the `rabbitmq` user themselves). The broker listens
# on 127.0.0.1:${RABBITMQ_NODE_PORT:-5672} only; the node is rabbit@localhost.
set -euo pipefail

export RABBITMQ_NODENAME=rabbit@localhost
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT="${RABBITMQ_NODE_PORT:-5672}"
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export RABBITMQ_PID_FILE=/var/lib/rabbitmq/kairoi-test.pid

START_TIMEOUT_S="${RABBITMQ_START_TIMEOUT_S:-120}"

log() { echo "rabbitmq.sh: $*" >&2; }

ctl() { rabbitmqctl -n "$RABBITMQ_NODENAME" "$@"; }

install_if_missing() {
    if command -v rabbitmq-server >/dev/null 2>&1 && command -v rabbitmqctl >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        log "rabbitmq-server is not installed and installing it needs root"
        exit 1
    fi
    log "installing rabbitmq-server from Debian's packages"
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
        log "apt-get failed (exit $rc)"
        exit "$rc"
    fi
}

node_pid() {
    # The beam's PID from the pid file, when that process is alive.
    local pid
    [ -s "$RABBITMQ_PID_FILE" ] || return 1
    pid="$(cat "$RABBITMQ_PID_FILE")"
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

node_up() {
    # The Erlang node answers (its RabbitMQ app may be stopped, e.g. by stop_app).
    command -v rabbitmqctl >/dev/null 2>&1 && ctl ping >/dev/null 2>&1
}

app_running() {
    # On RabbitMQ 3.10 `status` needs the app running.
    ctl status >/dev/null 2>&1
}

ensure_pid_file() {
    # Tests find the beam through the pid file; rewrite it if it went missing.
    node_pid >/dev/null && return 0
    ctl eval 'os:getpid().' | tr -d '"[:space:]' >"$RABBITMQ_PID_FILE"
    chown rabbitmq:rabbitmq "$RABBITMQ_PID_FILE" 2>/dev/null || true
}

start() {
    install_if_missing
    if node_up; then
        if ! app_running; then
            log "node up with its app stopped: starting the app"
            ctl start_app >/dev/null
            ctl await_startup >/dev/null
        fi
        ensure_pid_file
        log "already running (pid $(node_pid))"
        return
    fi
    mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
    chown rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq 2>/dev/null || true
    rm -f "$RABBITMQ_PID_FILE"
    log "starting node $RABBITMQ_NODENAME on 127.0.0.1:$RABBITMQ_NODE_PORT"
    rabbitmq-server -detached
    if ! timeout "$START_TIMEOUT_S" rabbitmqctl -n "$RABBITMQ_NODENAME" wait "$RABBITMQ_PID_FILE" >/dev/null; then
        log "node did not start within ${START_TIMEOUT_S}s; see /var/log/rabbitmq/"
        exit 1
    fi
    log "started (pid $(node_pid))"
}

epmd_pids() {
    # PIDs of epmd processes owned by the rabbitmq user (from /proc: no procps needed).
    local dir uid
    uid="$(id -u rabbitmq 2>/dev/null)" || return 0
    for dir in /proc/[0-9]*; do
        [ "$(cat "$dir/comm" 2>/dev/null)" = epmd ] || continue
        [ "$(stat -c %u "$dir" 2>/dev/null)" = "$uid" ] || continue
        echo "${dir#/proc/}"
    done
}

stop() {
    if node_up; then
        log "stopping node $RABBITMQ_NODENAME"
        if node_pid >/dev/null; then
            ctl stop "$RABBITMQ_PID_FILE" >/dev/null 2>&1 || ctl stop >/dev/null 2>&1 || true
        else
            ctl stop >/dev/null 2>&1 || true
        fi
    fi
    rm -f "$RABBITMQ_PID_FILE"
    # The node leaves epmd running. Kill the rabbitmq user's epmd by its PID,
    # but only when no other Erlang node is still registered with it.
    if command -v epmd >/dev/null 2>&1; then
        local names pid
        names="$(epmd -names 2>/dev/null | grep -c '^name ' || true)"
        if [ "${names:-0}" = 0 ]; then
            for pid in $(epmd_pids); do
                kill "$pid" 2>/dev/null || true
            done
        fi
    fi
    log "stopped"
}

status() {
    if node_up && app_running; then
        echo "running (pid $(node_pid))"
    else
        echo "not running"
        return 1
    fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
