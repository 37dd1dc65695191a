# shellcheck shell=bash
# Helpers for a private service node that the tests start and stop themselves
# (RabbitMQ now, PostgreSQL later): sourced by scripts/rabbitmq.sh and
# scripts/test.sh, never run.
#
# The pattern, for a service `svc` driven by scripts/svc.sh:
#   - a node lives in a directory of its own, by default a fresh
#     "$(private_tmp_dir svc)" (${TMPDIR:-/tmp}/kairoi-svc.XXXXXX); everything
#     the node writes (data, logs, pid file, config) stays under it;
#   - `svc.sh start DIR [--port N] [--owner PID]` claims DIR (a marker file),
#     picks free loopback ports with private_free_ports (or checks the one
#     given), starts the node and writes DIR/node.env (KEY=value lines, the
#     KAIROI_TEST_SVC_* variables the tests read);
#   - `svc.sh stop DIR` stops that node only (by its pid file and its own
#     ports, never by a name or a default port) and removes DIR;
#   - `svc.sh env DIR` prints node.env as `export` lines for eval;
#   - with --owner, DIR/owner records the process the node belongs to (pid and
#     start time); `svc.sh reap` (also run by every start) stops the nodes whose
#     owner has died without stopping them (a killed test run). A node started
#     without --owner is never reaped.
#   - scripts/test.sh sets a trap that runs `svc.sh stop DIR` before it starts
#     anything, so the node goes away whatever happens to the run.

PRIVATE_MARKER=.kairoi-private-node

private_log() { echo "${PRIVATE_LOG_NAME:-$(basename "$0")}: $*" >&2; }

private_die() {
    private_log "$*"
    exit 1
}

# private_tmp_dir NAME: a fresh empty directory for a node of service NAME.
private_tmp_dir() {
    mktemp -d "${TMPDIR:-/tmp}/kairoi-$1.XXXXXX"
}

# private_free_ports N [PORT...]: with PORT arguments, exit 1 unless each is
# free on loopback; then print N more distinct free loopback ports, one a line.
# Ports are drawn at random from 20000-32767, below Linux's ephemeral range so
# that an outgoing connection does not take one before the node binds it. Free
# means bindable on 127.0.0.1 and, when the machine has IPv6, on ::1 (epmd
# listens on both).
private_free_ports() {
    python3 - "$@" <<'EOF'
import errno
import random
import socket
import sys


def free(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        try:
            sock.bind((host, port))
        except OSError as error:
            if family == socket.AF_INET6 and error.errno == errno.EADDRNOTAVAIL:
                continue
            return False
        finally:
            sock.close()
    return True


count, given = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
for port in given:
    if not free(port):
        sys.exit(f"port {port} is in use")
chosen: list[int] = []
for port in random.sample(range(20000, 32768), 12768):
    if len(chosen) == count:
        break
    if port not in given and free(port):
        chosen.append(port)
print("\n".join(map(str, chosen)))
EOF
}

# private_claim DIR: make DIR a node directory (it must be missing, empty, or
# already claimed). Every later command refuses a directory without the marker.
private_claim() {
    local dir="$1"
    case "$dir" in
    /*) ;;
    *) private_die "$dir: give an absolute path" ;;
    esac
    case "$dir" in
    *[[:space:]]*) private_die "$dir: a path without spaces, please" ;;
    esac
    mkdir -p "$dir"
    if [ ! -e "$dir/$PRIVATE_MARKER" ] && [ -n "$(ls -A "$dir")" ]; then
        private_die "$dir is not empty and not a node directory: left alone"
    fi
    chmod 700 "$dir"
    touch "$dir/$PRIVATE_MARKER"
}

private_claimed() { [ -f "$1/$PRIVATE_MARKER" ]; }

# private_remove DIR: delete a node directory (only one this script claimed).
private_remove() {
    private_claimed "$1" && rm -rf "$1"
}

# A running process's start time (field 22 of /proc/PID/stat): with the pid, it
# names the process even after the pid has been reused. Fails for a zombie.
private_start_time() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    # shellcheck disable=SC2086 # split the fields on purpose
    set -- $stat
    [ "$1" != Z ] || return 1
    echo "${20}"
}

# private_set_owner DIR PID: the node belongs to process PID.
private_set_owner() {
    local started
    started="$(private_start_time "$2")" || private_die "no process $2 (--owner)"
    echo "$2 $started" >"$1/owner"
}

# private_orphaned DIR: true when DIR records an owner and that process is gone.
private_orphaned() {
    local pid started now
    [ -s "$1/owner" ] || return 1
    read -r pid started <"$1/owner" || return 1
    now="$(private_start_time "$pid")" || return 0
    [ "$now" != "$started" ]
}

# private_env_get DIR KEY: a value from DIR/node.env.
private_env_get() {
    sed -n "s/^$2=//p" "$1/node.env" 2>/dev/null | tail -n 1
}

# private_env_print DIR: node.env as `export KEY=value` lines.
private_env_print() {
    [ -s "$1/node.env" ] || private_die "$1/node.env: no node there"
    sed 's/^/export /' "$1/node.env"
}

# private_pid_alive PID NEEDLE: PID is running and its command line contains
# NEEDLE (so a reused pid is never taken for the node's process).
private_pid_alive() {
    [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2"
}
