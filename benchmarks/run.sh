#!/usr/bin/env bash
# The kairoi-trio benchmark (about 5-10 minutes; needs only .venv):
#   benchmarks/run.sh [all|set|lateness|restart] [--quick] [--profile] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m benchmarks "$@"
