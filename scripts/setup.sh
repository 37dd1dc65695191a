#!/usr/bin/env bash
# Create .venv (if missing) and install kairoi-trio into it with the given extras.
#   scripts/setup.sh            the server only
#   scripts/setup.sh test       plus what the tests need
#
# The install is editable, so source changes need no reinstall: pip runs only
# when .venv is new or pyproject.toml (the dependencies) changed since the last
# install with these extras. That makes scripts/serve.sh start at once.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.kairoi-installed${extras:+-$extras}"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
installed() { [ -f "$1" ] && [ "$(cat "$1")" = "$wanted" ]; }
# An install with the test extras includes the plain one.
if { installed "$stamp" || { [ -z "$extras" ] && installed .venv/.kairoi-installed-test; }; } &&
    .venv/bin/python -c 'import kairoi_trio' 2>/dev/null; then
    exit 0
fi
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install -q -e ".[$extras]"
else
    .venv/bin/python -m pip install -q -e .
fi
echo "$wanted" >"$stamp"
