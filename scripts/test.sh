#!/usr/bin/env bash
# Set up everything the tests need (virtualenv, packages, a loopback RabbitMQ
# from Debian's packages), run the whole suite, and stop the broker again.
#   scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
started_broker=0
if ! scripts/rabbitmq.sh status >/dev/null 2>&1; then
    scripts/rabbitmq.sh start
    started_broker=1
fi
stop_broker() { if [ "$started_broker" = 1 ]; then scripts/rabbitmq.sh stop || true; fi; }
trap stop_broker EXIT
export KAIROI_TEST_RABBITMQ=1
.venv/bin/python -m pytest "$@"
