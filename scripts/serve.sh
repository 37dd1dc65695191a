#!/usr/bin/env bash
# Set up and start the server on the embedded store (data in ./kairoi-data).
#   scripts/serve.sh [-c configuration.toml]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/kairoi-trio serve "$@"
