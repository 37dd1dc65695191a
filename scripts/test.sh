#!/usr/bin/env bash
# Set up everything the tests need (virtualenv, packages, RabbitMQ, PostgreSQL and
# Chromium from Debian's packages), start a private RabbitMQ node and a
# private PostgreSQL cluster for this run, run pytest, and stop both whatever
# happened.
#   scripts/test.sh [pytest arguments]
#
# The node (scripts/rabbitmq.sh) has its own name, free ports, epmd, cookie and
# a temporary directory; the cluster (scripts/postgres.sh) its own free port,
# socket directory and temporary data directory. The tests learn them from the
# KAIROI_TEST_RABBITMQ_* and KAIROI_TEST_POSTGRES_* variables exported here. A
# broker or cluster already running on this machine (say rabbit@localhost on
# 127.0.0.1:5672, PostgreSQL on 5432) is never stopped, frozen or reconfigured.
# See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/private-node.sh
. scripts/private-node.sh
PRIVATE_LOG_NAME=test.sh

rabbitmq_dir="$(private_tmp_dir rabbitmq)"
postgres_dir="$(private_tmp_dir postgres)"
nodes_pid=""
stop_nodes() {
    # A start still under way ends first (its node then stops below).
    if [ -n "$nodes_pid" ]; then wait "$nodes_pid" 2>/dev/null || true; fi
    # Both at once: RabbitMQ's stop takes seconds (rabbitmqctl), PostgreSQL's less.
    scripts/rabbitmq.sh stop "$rabbitmq_dir" &
    scripts/postgres.sh stop "$postgres_dir" || true
    wait $! || true
}
# The trap is set before anything starts; signals exit through it too.
trap stop_nodes EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# The nodes start while .venv is set up (about a minute the first time; RabbitMQ
# takes ~6 s to start, PostgreSQL ~1.5 s). One after the other, not together: each
# may install its packages with apt-get, which allows one at a time; pip does not
# need it.
{
    scripts/rabbitmq.sh start "$rabbitmq_dir" --owner $$
    scripts/postgres.sh start "$postgres_dir" --owner $$
    scripts/chromium.sh # the dashboard's browser tests: Debian's chromium, nothing started
} &
nodes_pid=$!
scripts/setup.sh test
wait "$nodes_pid" # the starts' exit status: a failed one ends the script here
nodes_pid=""
eval "$(scripts/rabbitmq.sh env "$rabbitmq_dir")"
eval "$(scripts/postgres.sh env "$postgres_dir")"

# Bytecode caches (the __pycache__ folders git ignores) even where the environment
# says not to write them: without, each of the suite's hundreds of server and
# command-line processes compiles src/ again (~0.15 s of CPU each), and each xdist
# worker rewrites and compiles every test module again (~7 s of CPU each).
unset PYTHONDONTWRITEBYTECODE

# In parallel (pytest-xdist): KAIROI_TEST_WORKERS processes, 3 unless set; the tests
# that must not run beside each other are grouped (--dist loadgroup, tests/conftest.py).
# `-n 0` (or any -n) among the arguments overrides it; `-p no:xdist` runs plain pytest.
parallel=(-n "${KAIROI_TEST_WORKERS:-3}" --dist loadgroup)
for arg in "$@"; do
    case "$arg" in no:xdist | -pno:xdist) parallel=() ;; esac
done
.venv/bin/python -m pytest "${parallel[@]}" "$@" # its exit status is the script's; the trap still runs
