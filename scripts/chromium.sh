#!/usr/bin/env bash
# Install Debian's Chromium for the dashboard's browser tests when it is missing.
#   scripts/chromium.sh          install `chromium` with apt-get unless /usr/bin/chromium exists
#
# Nothing is started: the tests (tests/e2e/test_dashboard.py) launch the browser
# themselves, headless, through Playwright for Python pointed at /usr/bin/chromium
# (Playwright's own browser download is never used). Installing needs root; as
# another user, install it first (`apt-get install chromium`), or the browser
# tests are skipped with the reason.
set -euo pipefail
CHROMIUM="${KAIROI_TEST_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "chromium.sh: $CHROMIUM is missing and installing it needs root (the browser tests will be skipped)" >&2
    exit 0
fi
echo "chromium.sh: installing chromium from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
# apt allows one install at a time: wait for another (RabbitMQ's, PostgreSQL's) to finish.
apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends chromium >/dev/null
